package psp_test

import (
	"crypto/sha256"
	"encoding/hex"
	"encoding/pem"
	"errors"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"testing"

	"github.com/sealdisk/sealdisk/format"
	"github.com/sealdisk/sealdisk/provider"
	"github.com/sealdisk/sealdisk/psp"
)

// The trust store lists each key by file name with its algorithm and SHA-256; removing one
// makes the running PSP refuse that provider at its next Reload, and only then.
func TestTrustListRemoveReload(t *testing.T) {
	w := newWorld(t, format.KEMDHKEMP384, format.SigECDSAP384)
	k2, err := provider.GenerateKey(format.SigEd25519)
	must(t, err)
	must(t, provider.SaveKeyPair(filepath.Join(w.Dir, "p2"), "p2", k2))
	must(t, psp.AddTrustedProvider(w.ChipDir, filepath.Join(w.Dir, "p2", "p2.pub")))

	keys, err := psp.TrustedProviders(w.ChipDir)
	must(t, err)
	if len(keys) != 2 {
		t.Fatalf("listed %d keys, want 2: %v", len(keys), keys)
	}
	want := map[string]string{}
	for _, pub := range []string{w.ProviderPubPath, filepath.Join(w.Dir, "p2", "p2.pub")} {
		b, err := os.ReadFile(pub)
		must(t, err)
		blk, _ := pem.Decode(b)
		sum := sha256.Sum256(blk.Bytes)
		want[hex.EncodeToString(sum[:])] = ""
	}
	var algs []string
	for _, k := range keys {
		if _, ok := want[k.SHA256]; !ok {
			t.Errorf("listed key %s with sha256 %s, not one that was added", k.Name, k.SHA256)
		}
		if _, err := os.Stat(filepath.Join(w.ChipDir, psp.TrustDir, k.Name)); err != nil {
			t.Errorf("listed name %s is not a file of the trust store: %v", k.Name, err)
		}
		algs = append(algs, k.Alg)
	}
	slices.Sort(algs)
	if !slices.Equal(algs, []string{format.SigECDSAP384.String(), format.SigEd25519.String()}) {
		t.Errorf("algorithms %v", algs)
	}

	p := open(t, w.ChipDir, nil, 0)
	c, h, _ := issueWith(t, k2, w.request(t))
	if _, err := p.UnsealImageKey(c, h); err != nil {
		t.Fatal(err)
	}
	var name string
	for _, k := range keys {
		if k.Alg == format.SigEd25519.String() {
			name = k.Name
		}
	}
	must(t, psp.RemoveTrustedProvider(w.ChipDir, strings.TrimSuffix(name, ".pub"))) // .pub optional
	if _, err := p.UnsealImageKey(c, h); err != nil {
		t.Fatalf("removal took effect before the reload: %v", err)
	}
	changed, err := p.Reload()
	must(t, err)
	if len(changed) != 0 {
		t.Fatalf("identity changed: %v", changed)
	}
	if _, err := p.UnsealImageKey(c, h); !errors.Is(err, psp.ErrUnknownProvider) {
		t.Fatalf("removed provider after reload: %v", err)
	}
	if keys, _ := psp.TrustedProviders(w.ChipDir); len(keys) != 1 {
		t.Fatalf("%d keys after remove", len(keys))
	}

	// Bad names say what was wrong.
	if err := psp.RemoveTrustedProvider(w.ChipDir, name); !errors.Is(err, psp.ErrNotTrusted) || !strings.Contains(err.Error(), name) {
		t.Errorf("remove twice: %v", err)
	}
	for _, bad := range []string{"", "../kem.key", "..", "a/b"} {
		if err := psp.RemoveTrustedProvider(w.ChipDir, bad); err == nil || !strings.Contains(err.Error(), "is not a file name") {
			t.Errorf("remove %q: %v", bad, err)
		}
	}
	if _, err := psp.TrustedProviders(filepath.Join(w.Dir, "nope")); err == nil {
		t.Error("listing a missing PSP directory succeeded")
	}
}

// A trust store that no longer loads leaves the loaded one in force; a changed identity file
// is reported, not loaded.
func TestReloadRefusesBadTrustAndReportsIdentity(t *testing.T) {
	w := newWorld(t, format.KEMDHKEMP384, format.SigECDSAP384)
	p := open(t, w.ChipDir, nil, 0)
	c, h, _ := w.issue(t, nil)
	junk := filepath.Join(w.ChipDir, psp.TrustDir, "junk.pub")
	must(t, os.WriteFile(junk, []byte("junk"), 0o644))
	if _, err := p.Reload(); err == nil || !strings.Contains(err.Error(), "junk.pub") || !strings.Contains(err.Error(), "trust unchanged") {
		t.Fatalf("reload with a junk key: %v", err)
	}
	if _, err := p.UnsealImageKey(c, h); err != nil {
		t.Fatalf("a failed reload changed the trust: %v", err)
	}
	must(t, os.Remove(junk))
	must(t, os.WriteFile(filepath.Join(w.ChipDir, psp.ChipCrtFile), []byte("replaced"), 0o644))
	changed, err := p.Reload()
	must(t, err)
	if !slices.Equal(changed, []string{psp.ChipCrtFile}) {
		t.Fatalf("changed identity %v, want [%s]", changed, psp.ChipCrtFile)
	}
}
