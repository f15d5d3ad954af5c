package daemon

import (
	"context"
	"crypto/sha256"
	"crypto/x509"
	"encoding/hex"
	"encoding/json"
	"errors"
	"net/http"
	"net/http/httptest"
	"path/filepath"
	"slices"
	"strings"
	"testing"

	"github.com/sealdisk/sealdisk/format"
	"github.com/sealdisk/sealdisk/provider"
	"github.com/sealdisk/sealdisk/psp"
	"github.com/sealdisk/sealdisk/store"
)

// trustedName is the trust store's file name for the provider key at pub.
func trustedName(t *testing.T, chipDir, pub string) string {
	t.Helper()
	k, err := psp.ReadProviderKey(pub)
	if err != nil {
		t.Fatal(err)
	}
	der, err := x509.MarshalPKIXPublicKey(k)
	if err != nil {
		t.Fatal(err)
	}
	sum := sha256.Sum256(der)
	keys, err := psp.TrustedProviders(chipDir)
	if err != nil {
		t.Fatal(err)
	}
	for _, tk := range keys {
		if tk.SHA256 == hex.EncodeToString(sum[:]) {
			return tk.Name
		}
	}
	t.Fatalf("%s is not in the trust store: %v", pub, keys)
	return ""
}

// A reload re-reads the trust store: a provider added is accepted (its VM, refused at start,
// attaches), one removed is refused for new attaches (its attached VM keeps running and is
// listed), all without a restart; SIGHUP and the admin API's reload are this one call.
func TestReloadReadsTrustStore(t *testing.T) {
	e := newTestEnv(t)
	img1 := e.image(t, e.w, "vm1.img") // the world's provider: trusted

	// A second provider (Ed25519). Its image is made while the fixture's PSP trusts it (the
	// fixture reads the root keeper from it); the daemon starts without it.
	k2, err := provider.GenerateKey(format.SigEd25519)
	if err != nil {
		t.Fatal(err)
	}
	p2dir := filepath.Join(e.dir, "p2")
	if err := provider.SaveKeyPair(p2dir, "p2", k2); err != nil {
		t.Fatal(err)
	}
	p2pub := filepath.Join(p2dir, "p2.pub")
	if err := psp.AddTrustedProvider(e.w.ChipDir, p2pub); err != nil {
		t.Fatal(err)
	}
	if err := e.w.PSP.ReloadTrust(); err != nil {
		t.Fatal(err)
	}
	w2 := *e.w
	w2.Provider = k2
	img2 := e.image(t, &w2, "vm2.img")
	img3 := e.image(t, &w2, "vm3.img")
	p2name := trustedName(t, e.w.ChipDir, p2pub)
	if err := psp.RemoveTrustedProvider(e.w.ChipDir, p2name); err != nil {
		t.Fatal(err)
	}

	e.writeConfig(t, e.vm("vm1", img1, false), e.vm("vm2", img2, false))
	d := e.start(t)
	if got := attached(d); !slices.Equal(got, []string{"vm1"}) {
		t.Fatalf("attached at start %v", got)
	}
	if why := d.Status().NotServing["vm2"]; !strings.Contains(why, psp.ErrUnknownProvider.Error()) {
		t.Fatalf("vm2 at start: %q", why)
	}

	// trust add + reload: vm2 attaches, and so does another image of that provider.
	if err := psp.AddTrustedProvider(e.w.ChipDir, p2pub); err != nil {
		t.Fatal(err)
	}
	res, err := d.Reload(context.Background())
	if err != nil {
		t.Fatal(err)
	}
	if !slices.Equal(res.Attached, []string{"vm2"}) || len(res.Failed) != 0 || len(res.Untrusted) != 0 || len(res.Restart) != 0 {
		t.Fatalf("reload after trust add: %+v", res)
	}
	if err := d.Attach(e.vm("vm3", img3, false)); err != nil {
		t.Fatalf("attach of the added provider's image: %v", err)
	}
	if err := d.Detach(context.Background(), "vm3"); err != nil {
		t.Fatal(err)
	}

	// trust remove + reload (through the admin API this time): vm2 keeps running and is
	// listed; a new attach of that provider's image is refused (422).
	if err := psp.RemoveTrustedProvider(e.w.ChipDir, p2name); err != nil {
		t.Fatal(err)
	}
	if err := d.Attach(e.vm("vm3", img3, false)); err != nil {
		t.Fatalf("the removal took effect before a reload: %v", err)
	}
	if err := d.Detach(context.Background(), "vm3"); err != nil {
		t.Fatal(err)
	}
	rec := httptest.NewRecorder()
	d.adminHandler().ServeHTTP(rec, httptest.NewRequest("POST", "/v1/reload", nil))
	if rec.Code != http.StatusOK {
		t.Fatalf("POST /v1/reload: %d %s", rec.Code, rec.Body)
	}
	res = &ReloadResult{}
	if err := json.Unmarshal(rec.Body.Bytes(), res); err != nil {
		t.Fatal(err)
	}
	if !slices.Equal(res.Untrusted, []string{"vm2"}) || len(res.Attached)+len(res.Detached)+len(res.Failed) != 0 {
		t.Fatalf("reload after trust remove: %+v", res)
	}
	if got := attached(d); !slices.Equal(got, []string{"vm1", "vm2"}) {
		t.Fatalf("attached after trust remove %v", got)
	}
	err = d.Attach(e.vm("vm3", img3, false))
	if !errors.Is(err, psp.ErrUnknownProvider) || httpStatus(err) != http.StatusUnprocessableEntity {
		t.Fatalf("attach of the removed provider's image: %v", err)
	}
	if f, err := store.OpenLocked(img3, false); err != nil { // the refused launch let go of it
		t.Fatalf("a refused attach kept its image locked: %v", err)
	} else {
		f.Close()
	}

	// Detached, vm2 (still in the config) is attached again by the next reload: refused now.
	if err := d.Detach(context.Background(), "vm2"); err != nil {
		t.Fatal(err)
	}
	res, err = d.Reload(context.Background())
	if err != nil {
		t.Fatal(err)
	}
	if why := res.Failed["vm2"]; !strings.Contains(why, psp.ErrUnknownProvider.Error()) || len(res.Attached) != 0 {
		t.Fatalf("reload with vm2's provider gone: %+v", res)
	}
}

// A trust store that does not load fails the reload and changes nothing: not the trust, not
// the VMs.
func TestReloadWithBadTrustStoreChangesNothing(t *testing.T) {
	e := newTestEnv(t)
	img1 := e.image(t, e.w, "vm1.img")
	img2 := e.image(t, e.w, "vm2.img")
	e.writeConfig(t, e.vm("vm1", img1, false))
	d := e.start(t)
	junk := filepath.Join(e.w.ChipDir, psp.TrustDir, "junk.pub")
	writeFile(t, junk, "not a key")
	e.writeConfig(t, e.vm("vm2", img2, false))
	if _, err := d.Reload(context.Background()); err == nil || !strings.Contains(err.Error(), "junk.pub") || !strings.Contains(err.Error(), "nothing changed") {
		t.Fatalf("reload with a junk trust file: %v", err)
	}
	if got := attached(d); !slices.Equal(got, []string{"vm1"}) {
		t.Fatalf("a failed reload changed the VMs: %v", got)
	}
	if err := d.Attach(e.vm("vm2", img2, false)); err != nil {
		t.Fatalf("a failed reload changed the trust: %v", err)
	}
}
