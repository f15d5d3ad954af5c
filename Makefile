# sealdisk — see README.md. `make demo` and `make test` work on a fresh Debian machine.
GO       ?= go
BIN      := bin/sealdisk
PKGS     := ./...
export PATH := /usr/local/go/bin:$(HOME)/go/bin:$(PATH)

.PHONY: all build deps lint unit e2e fuzz test demo bench clean

all: build

build:
	$(GO) build -o $(BIN) ./cmd/sealdisk

# Debian packages and Go tools the tests drive; installs only what is missing.
deps:
	scripts/deps.sh

lint:
	@bad=$$(gofmt -l $$(git ls-files '*.go' 2>/dev/null || find . -name '*.go')); \
	  if [ -n "$$bad" ]; then echo "gofmt needed: $$bad"; exit 1; fi
	$(GO) vet $(PKGS)
	staticcheck $(PKGS)

unit:
	$(GO) test -race -count=1 $$($(GO) list ./... | grep -v /tests)

e2e: build
	$(GO) test -count=1 -timeout 30m ./tests/...

# Every Fuzz target in the tree, briefly (FUZZTIME=10s by default).
FUZZTIME ?= 10s
fuzz:
	@for f in $$(grep -rl --include='*_test.go' '^func Fuzz' .); do \
	  pkg=./$$(dirname $$f); \
	  for t in $$(grep -o '^func Fuzz[A-Za-z0-9_]*' $$f | sed 's/^func //'); do \
	    echo "fuzz $$pkg $$t"; \
	    $(GO) test -run='^$$' -fuzz="^$$t\$$" -fuzztime=$(FUZZTIME) $$pkg || exit 1; \
	  done; \
	done

test: deps lint unit e2e fuzz

demo: build
	scripts/demo.sh

bench: build
	scripts/bench-seal.sh

clean:
	rm -rf bin demo
