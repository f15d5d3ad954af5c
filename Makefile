# sealdisk — see README.md. `make demo` and `make test` work on a fresh Debian machine.
GO       ?= go
BIN      := bin/sealdisk
PKGS     := ./...
# Ceph RBD images (store/rbd) need cgo and librbd (librbd-dev, which `make deps` installs); the
# build tags turn them on. Without librbd's header the binary is built without RBD, and says so
# when given an rbd: location; `go build ./...` with no tags never needs cgo.
RBDTAGS  := rbd,pacific
TAGS     ?= $(if $(wildcard /usr/include/rbd/librbd.h),$(RBDTAGS))
export CGO_ENABLED := $(if $(TAGS),1,$(CGO_ENABLED))
TAGFLAGS  = -tags '$(TAGS)'
# `sealdisk version`: the nearest tag and commits since (or the commit), -dirty when changed.
VERSION  ?= $(shell git describe --tags --always --dirty 2>/dev/null || echo dev)
LDFLAGS   = -X main.version=$(VERSION)
MANDIR   ?= man
# Go and the tools `go install` puts in GOPATH/bin (staticcheck), whatever the caller's PATH.
export PATH := /usr/local/go/bin:$(shell PATH=/usr/local/go/bin:$$PATH go env GOPATH 2>/dev/null)/bin:$(PATH)

.PHONY: all build man deps lint unit e2e fuzz test demo bench bench-smoke bench-seal bench-engine bench-fuse bench-rbd clean
# The gate's steps run in order (deps before the tests that need them), even under make -j.
.NOTPARALLEL:

all: build

build:
	$(GO) build $(TAGFLAGS) -ldflags '$(LDFLAGS)' -o $(BIN) ./cmd/sealdisk

# A man page per command (sealdisk.1, sealdisk-serve.1, …) from the commands' help, in MANDIR.
man: build
	$(BIN) man $(MANDIR)

# Debian packages and Go tools the tests drive; installs only what is missing.
deps:
	scripts/deps.sh

# gofmt over every Go file on disk (not only tracked ones, so a new file is caught before CI).
lint:
	@bad=$$(find . -name '*.go' -not -path './.git/*' -not -path './demo/*' -print0 | xargs -0 gofmt -l); \
	  if [ -n "$$bad" ]; then echo "gofmt needed:"; echo "$$bad"; exit 1; fi
	$(GO) vet $(PKGS)
	$(GO) vet $(TAGFLAGS) $(PKGS)
	staticcheck $(TAGFLAGS) $(PKGS)

# Unit tests: every package but the end-to-end one, which e2e runs without -race.
# The engine's memory bound is measured without -race (the detector's shadow memory hides it),
# and its crash test runs once more without -race for timing-independent coverage.
unit:
	$(GO) test -race -count=1 $(TAGFLAGS) $$($(GO) list ./... | grep -vx "$$($(GO) list -m)/tests")
	$(GO) test -count=1 -run 'TestMemoryBounded|TestCrashConsistency' -v ./engine

e2e: build
	$(GO) test -count=1 $(TAGFLAGS) -timeout 30m ./tests/...

# Every Fuzz target in the tree, briefly. FUZZTIME is an execution count, not a duration: a
# duration races Go's fuzz coordinator at the deadline (golang/go#75804, fixed only in go1.27)
# and fails the run with a bare "context deadline exceeded" and no crasher.
FUZZTIME ?= 40000x
fuzz:
	@for f in $$(grep -rl --include='*_test.go' --exclude-dir=.git --exclude-dir=demo '^func Fuzz' . | sort); do \
	  pkg=$$(dirname $$f); \
	  for t in $$(grep -o '^func Fuzz[A-Za-z0-9_]*' $$f | sed 's/^func //'); do \
	    echo "fuzz $$pkg $$t"; \
	    $(GO) test -run='^$$' -fuzz="^$$t\$$" -fuzztime=$(FUZZTIME) $$pkg || exit 1; \
	  done; \
	done

test: deps lint unit e2e fuzz bench-smoke

demo: build
	scripts/demo.sh

# fio against the peers (nbdkit-luks, qemu-nbd LUKS, qemu-storage-daemon FUSE, gocryptfs,
# plain nbdkit), images on the disk file system first, then tmpfs, interleaved rounds; JSON
# lines in bench-results.jsonl. CONTENDED=1: every core busy; APPEND=1: add to BENCHMARKS.md.
bench: build
	scripts/bench.sh

# The bench command itself, in a few seconds (1 s runs, sealdisk and nbdkit-luks): part of test.
bench-smoke: build
	SHORT=1 JSON=$$(mktemp /tmp/bench-smoke.XXXX.jsonl) scripts/bench.sh

# Seal/unseal throughput beside qemu-img's LUKS conversion (BENCHMARKS.md).
bench-seal: build
	scripts/bench-seal.sh

# Engine 4K/64K random I/O beside raw AES-256-GCM, same run (BENCHMARKS.md). Five runs of
# each case: single runs on a shared machine vary by several points; read the medians.
bench-engine:
	$(GO) test -run='^$$' -bench='Engine|RawAESGCM' -benchtime=3s -count=5 ./engine

# FUSE file vs qemu-storage-daemon's LUKS FUSE export and gocryptfs, same run (BENCHMARKS.md).
bench-fuse:
	scripts/bench-fuse.sh

# NBD on Ceph RBD: sealdisk vs qemu's rbd driver with librbd LUKS2 vs plain rbd, one throwaway
# cluster, same run (BENCHMARKS.md).
bench-rbd:
	scripts/bench-rbd.sh

clean:
	rm -rf bin demo man
