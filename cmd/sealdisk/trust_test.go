package main

import (
	"os"
	"path/filepath"
	"strings"
	"testing"
)

// trust list prints each key's file name, algorithm and SHA-256 (the one inspect prints);
// trust remove takes that name, and the offline tools refuse the provider at once.
func TestTrustListRemove(t *testing.T) {
	d := t.TempDir()
	p := func(s string) string { return filepath.Join(d, s) }
	ok(t, "vendor", "init", "--dir", p("vendor"))
	ok(t, "psp", "init", "--dir", p("psp"), "--vendor", p("vendor"), "--kem", "p384")
	ok(t, "provider", "keygen", "--dir", p("prov"))
	ok(t, "provider", "keygen", "--dir", p("prov2"), "--alg", "ed25519")
	if out := ok(t, "psp", "trust", "list", "--dir", p("psp")); !strings.Contains(out, "no trusted provider keys") {
		t.Fatalf("empty list: %q", out)
	}
	ok(t, "psp", "trust", "add", "--dir", p("psp"), p("prov/provider.pub"))
	ok(t, "psp", "trust", "add", "--dir", p("psp"), p("prov2/provider.pub"))
	must(t, os.WriteFile(p("fw"), []byte("firmware"), 0o644))
	must(t, os.WriteFile(p("disk.raw"), make([]byte, 8192), 0o644))
	ok(t, "seal", "--in", p("disk.raw"), "--out", p("vm.img"), "--chip", p("psp/chip.crt"), "--vendor-root", p("vendor/vendor.crt"),
		"--provider-key", p("prov/provider.key"), "--firmware", p("fw"))
	sum := inspect(t, p("vm.img"))["provider_key_sha256"].(string)

	lines := strings.Split(strings.TrimSpace(ok(t, "psp", "trust", "list", "--dir", p("psp"))), "\n")
	if len(lines) != 2 {
		t.Fatalf("list: %q", lines)
	}
	var name string
	for _, l := range lines {
		f := strings.Fields(l)
		if len(f) != 3 || !strings.HasSuffix(f[0], ".pub") || !strings.HasPrefix(f[2], "sha256:") || len(f[2]) != len("sha256:")+64 {
			t.Fatalf("list line %q: want NAME ALG sha256:HEX", l)
		}
		if _, err := os.Stat(p("psp/trust/" + f[0])); err != nil {
			t.Fatalf("listed %s: %v", f[0], err)
		}
		if f[2] == "sha256:"+sum {
			name = f[0]
			if f[1] != "ecdsa-p384" {
				t.Fatalf("the image's provider is listed as %s", f[1])
			}
		} else if f[1] != "ed25519" {
			t.Fatalf("the second provider is listed as %s", f[1])
		}
	}
	if name == "" {
		t.Fatalf("the image's provider key (sha256 %s) is not listed: %q", sum, lines)
	}

	ok(t, "unseal", "--in", p("vm.img"), "--out", p("a.raw"), "--psp", p("psp"))
	if out := ok(t, "psp", "trust", "remove", "--dir", p("psp"), name); !strings.Contains(out, "reload") {
		t.Fatalf("remove said %q; want a reminder to reload a running server", out)
	}
	if _, err := sealdisk(t, "unseal", "--in", p("vm.img"), "--out", p("b.raw"), "--psp", p("psp")); err == nil || !strings.Contains(err.Error(), "unknown provider") {
		t.Fatalf("unseal after trust remove: %v", err)
	}
	if lines := strings.Split(strings.TrimSpace(ok(t, "psp", "trust", "list", "--dir", p("psp"))), "\n"); len(lines) != 1 || strings.Contains(lines[0], sum) {
		t.Fatalf("list after remove: %q", lines)
	}

	for _, c := range []struct {
		args []string
		want string
	}{
		{[]string{"psp", "trust", "remove", "--dir", p("psp"), name}, "no such trusted provider key"},
		{[]string{"psp", "trust", "remove", "--dir", p("psp"), "../kem.key"}, "is not a file name"},
		{[]string{"psp", "trust", "remove", p("x.pub")}, "--dir"},
		{[]string{"psp", "trust", "list"}, "--dir"},
		{[]string{"psp", "trust", "list", "--dir", p("nope")}, "nope"},
	} {
		if _, err := sealdisk(t, c.args...); err == nil || !strings.Contains(err.Error(), c.want) {
			t.Errorf("sealdisk %s: %v; want an error saying %q", strings.Join(c.args, " "), err, c.want)
		}
	}
	if _, err := os.Stat(p("psp/kem.key")); err != nil {
		t.Fatal("remove ../kem.key removed it")
	}
}
