package psp_test

import (
	"bytes"
	"crypto/sha512"
	"encoding/hex"
	"errors"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/google/uuid"

	"github.com/sealdisk/sealdisk/format"
	"github.com/sealdisk/sealdisk/provider"
	"github.com/sealdisk/sealdisk/psp"
)

func TestUnsealBothKEMsAndSigAlgs(t *testing.T) {
	for _, kem := range []uint16{format.KEMMLKEM768X25519, format.KEMDHKEMP384} {
		for _, alg := range []format.SigAlg{format.SigECDSAP384, format.SigEd25519} {
			t.Run(format.KEMName(kem)+"/"+alg.String(), func(t *testing.T) {
				w := newWorld(t, kem, alg)
				c, h, key := w.issue(t, nil)
				if c.KEM != kem || c.ProviderAlg != alg {
					t.Fatalf("certificate has KEM 0x%04x alg %s", c.KEM, c.ProviderAlg)
				}
				got, err := open(t, w.ChipDir, nil, 0).UnsealImageKey(c, h)
				if err != nil || !bytes.Equal(got, key) {
					t.Fatalf("unseal: %v", err)
				}
				// The same certificate through Launch binds the same key.
				b := &binder{}
				l, err := open(t, w.ChipDir, b, 0).Launch(psp.LaunchRequest{VM: "vm", Cert: c, Header: h, FirmwarePath: w.Firmware})
				must(t, err)
				if !bytes.Equal(b.key(l.ASID), key) {
					t.Fatal("Launch bound another key")
				}
			})
		}
	}
}

func TestVerifyCertificateVerdict(t *testing.T) {
	w := newWorld(t, format.KEMMLKEM768X25519, format.SigECDSAP384)
	c, h, _ := w.issue(t, nil)
	v, err := open(t, w.ChipDir, nil, 0).VerifyCertificate(c, h)
	must(t, err)
	if v.Signature != "valid" || v.CertDigest != sha512.Sum384(c.Bytes()) {
		t.Fatalf("verdict %+v", v)
	}
}

func TestUnknownProvider(t *testing.T) {
	w := newWorld(t, format.KEMMLKEM768X25519, format.SigECDSAP384)
	stranger, err := provider.GenerateKey(format.SigECDSAP384)
	must(t, err)
	c, h, _ := issueWith(t, stranger, w.request(t))
	_, err = open(t, w.ChipDir, nil, 0).UnsealImageKey(c, h)
	if !errors.Is(err, psp.ErrUnknownProvider) {
		t.Fatal(err)
	}
}

func TestReloadTrust(t *testing.T) {
	w := newWorld(t, format.KEMMLKEM768X25519, format.SigEd25519)
	p := open(t, w.ChipDir, nil, 0)
	k, err := provider.GenerateKey(format.SigEd25519)
	must(t, err)
	must(t, provider.SaveKeyPair(filepath.Join(w.Dir, "p2"), "p2", k))
	c, h, _ := issueWith(t, k, w.request(t))
	if _, err := p.UnsealImageKey(c, h); !errors.Is(err, psp.ErrUnknownProvider) {
		t.Fatal(err)
	}
	must(t, psp.AddTrustedProvider(w.ChipDir, filepath.Join(w.Dir, "p2", "p2.pub")))
	must(t, psp.AddTrustedProvider(w.ChipDir, filepath.Join(w.Dir, "p2", "p2.pub"))) // idempotent
	must(t, p.ReloadTrust())
	if _, err := p.UnsealImageKey(c, h); err != nil {
		t.Fatal(err)
	}
	files, _ := filepath.Glob(filepath.Join(w.ChipDir, psp.TrustDir, "*.pub"))
	if len(files) != 2 {
		t.Fatalf("trust store has %d keys, want 2", len(files))
	}
}

func TestBadSignature(t *testing.T) {
	for _, alg := range []format.SigAlg{format.SigECDSAP384, format.SigEd25519} {
		t.Run(alg.String(), func(t *testing.T) {
			w := newWorld(t, format.KEMMLKEM768X25519, alg)
			p := open(t, w.ChipDir, nil, 0)

			c, h, _ := w.issue(t, nil)
			c.Signature[len(c.Signature)/2] ^= 1
			if _, err := p.UnsealImageKey(c, h); !errors.Is(err, psp.ErrBadSignature) {
				t.Fatal("flipped signature:", err)
			}

			// A stored body byte changed after signing: the image_uuid's last byte (offset
			// 8+2+2+15) is any value to the parser, so the bytes still parse.
			c, _, _ = w.issue(t, nil)
			raw := c.Bytes()
			raw[27] ^= 1
			c2, err := format.ParseCertificate(raw)
			must(t, err)
			h2, err := format.NewHeader(c2.UUID, c2.VirtualSize, c2.SectorSize, c2.Suite, c2.ReadOnly, format.Layout{}, raw)
			must(t, err)
			if _, err := p.UnsealImageKey(c2, h2); !errors.Is(err, psp.ErrBadSignature) {
				t.Fatal("flipped body byte:", err)
			}

			// The certificate names the trusted key but claims the other algorithm.
			c, h, _ = w.issue(t, nil)
			c.ProviderAlg = format.SigEd25519 + format.SigECDSAP384 - alg
			_, err = c.MarshalBody()
			must(t, err)
			c3, err := format.ParseCertificate(c.Bytes())
			must(t, err)
			if _, err := p.UnsealImageKey(c3, h); !errors.Is(err, psp.ErrBadSignature) {
				t.Fatal("algorithm swap:", err)
			}
		})
	}
}

func TestWrongChip(t *testing.T) {
	w := newWorld(t, format.KEMMLKEM768X25519, format.SigECDSAP384)
	c, h, _ := w.issue(t, func(r *req) { r.Chip = w.Chip2 })
	p := open(t, w.ChipDir, nil, 0)
	_, err := p.UnsealImageKey(c, h)
	mine, theirs := p.ID(), w.Chip2.ID
	if !errors.Is(err, psp.ErrWrongChip) ||
		!strings.Contains(err.Error(), hex.EncodeToString(mine[:8])) || !strings.Contains(err.Error(), hex.EncodeToString(theirs[:8])) {
		t.Fatal(err)
	}
	// The chip it is for opens it.
	if _, err := open(t, w.Chip2Dir, nil, 0).UnsealImageKey(c, h); err != nil {
		t.Fatal(err)
	}
}

// TestValidityWindow checks not_before ≤ now < not_after at both edges.
func TestValidityWindow(t *testing.T) {
	w := newWorld(t, format.KEMMLKEM768X25519, format.SigECDSAP384)
	nb, na := w.now, w.now.Add(time.Hour)
	c, h, _ := w.issue(t, func(r *req) { r.NotBefore, r.NotAfter = nb, na })
	for _, tc := range []struct {
		name string
		now  time.Time
		want error
	}{
		{"not yet valid", nb.Add(-time.Second), psp.ErrNotYetValid},
		{"not_before", nb, nil},
		{"last second", na.Add(-time.Second), nil},
		{"expired at not_after", na, psp.ErrExpired},
		{"expired", na.Add(24 * time.Hour), psp.ErrExpired},
	} {
		t.Run(tc.name, func(t *testing.T) {
			_, err := openAt(t, w.ChipDir, tc.now).UnsealImageKey(c, h)
			if tc.want == nil && err != nil || !errors.Is(err, tc.want) {
				t.Fatalf("at %s: %v, want %v", tc.now, err, tc.want)
			}
		})
	}
}

func TestImageMismatch(t *testing.T) {
	w := newWorld(t, format.KEMMLKEM768X25519, format.SigECDSAP384)
	p := open(t, w.ChipDir, &binder{}, 0)
	for _, tc := range []struct {
		field string
		edit  func(h *format.Header)
	}{
		{"image_uuid", func(h *format.Header) { h.UUID = uuid.New() }},
		{"virtual_size", func(h *format.Header) { h.VirtualSize *= 2 }},
		{"sector_size", func(h *format.Header) { h.SectorSize = 512 }},
		{"data_suite", func(h *format.Header) { h.Suite = format.SuiteSM4GCM }},
		{"flags", func(h *format.Header) { h.ReadOnly = true }},
	} {
		t.Run(tc.field, func(t *testing.T) {
			c, h, _ := w.issue(t, nil)
			tc.edit(h)
			_, err := p.UnsealImageKey(c, h)
			if !errors.Is(err, psp.ErrImageMismatch) || !errors.Is(err, format.ErrImageMismatch) || !strings.Contains(err.Error(), tc.field) {
				t.Fatal(err)
			}
			if _, err := p.Launch(psp.LaunchRequest{VM: "vm", Cert: c, Header: h, FirmwarePath: w.Firmware}); !errors.Is(err, psp.ErrImageMismatch) {
				t.Fatal("launch:", err)
			}
		})
	}
}

func TestFirmwareMismatch(t *testing.T) {
	w := newWorld(t, format.KEMMLKEM768X25519, format.SigECDSAP384)
	b := &binder{}
	p := open(t, w.ChipDir, b, 1)
	c, h, _ := w.issue(t, nil)
	other := filepath.Join(w.Dir, "other.fd")
	must(t, os.WriteFile(other, []byte("tampered firmware"), 0o644))
	_, err := p.Launch(psp.LaunchRequest{VM: "vm0", Cert: c, Header: h, FirmwarePath: other})
	if !errors.Is(err, psp.ErrFirmwareMismatch) || !strings.Contains(err.Error(), other) {
		t.Fatal(err)
	}
	if b.loadCount() != 0 {
		t.Fatal("LoadKey was called for a refused firmware")
	}
	// The refusal took no ASID: the one-slot pool still admits the right firmware.
	if _, err := p.Launch(psp.LaunchRequest{VM: "vm1", Cert: c, Header: h, FirmwarePath: w.Firmware}); err != nil {
		t.Fatal(err)
	}
	if _, err := p.Launch(psp.LaunchRequest{VM: "vm2", Cert: c, Header: h, FirmwarePath: filepath.Join(w.Dir, "missing.fd")}); err == nil || errors.Is(err, psp.ErrFirmwareMismatch) {
		t.Fatal("missing firmware:", err)
	}
}

func TestFirmwareAnyAllowedMeasurement(t *testing.T) {
	w := newWorld(t, format.KEMMLKEM768X25519, format.SigECDSAP384)
	m, err := psp.Measure(w.Firmware, format.MeasureSHA384)
	must(t, err)
	other := bytes.Repeat([]byte{7}, 48)
	c, h, _ := w.issue(t, func(r *req) { r.Measurements = [][]byte{other, m} })
	b := &binder{}
	l, err := open(t, w.ChipDir, b, 0).Launch(psp.LaunchRequest{VM: "vm", Cert: c, Header: h, FirmwarePath: w.Firmware})
	must(t, err)
	if !bytes.Equal(l.Measurement, m) || !l.FirmwareOK || l.MeasureAlg != format.MeasureSHA384 {
		t.Fatalf("%+v", l)
	}
}

func TestASIDExhausted(t *testing.T) {
	w := newWorld(t, format.KEMMLKEM768X25519, format.SigECDSAP384)
	b := &binder{}
	p := open(t, w.ChipDir, b, 2)
	c, h, _ := w.issue(t, nil)
	launch := func(vm string) (*psp.Launch, error) {
		return p.Launch(psp.LaunchRequest{VM: vm, Cert: c, Header: h, FirmwarePath: w.Firmware})
	}
	l1, err := launch("vm1")
	must(t, err)
	l2, err := launch("vm2")
	must(t, err)
	if l1.ASID != 1 || l2.ASID != 2 {
		t.Fatalf("ASIDs %d, %d", l1.ASID, l2.ASID)
	}
	if _, err := launch("vm3"); !errors.Is(err, psp.ErrASIDExhausted) {
		t.Fatal(err)
	}
	if b.loadCount() != 2 {
		t.Fatalf("LoadKey called %d times", b.loadCount())
	}
	must(t, p.Detach(l1.ASID))
	l3, err := launch("vm3")
	must(t, err)
	if l3.ASID != 1 {
		t.Fatalf("freed ASID not reused: got %d", l3.ASID)
	}
}

func TestExplicitASID(t *testing.T) {
	w := newWorld(t, format.KEMMLKEM768X25519, format.SigECDSAP384)
	p := open(t, w.ChipDir, &binder{}, 4)
	c, h, _ := w.issue(t, nil)
	l, err := p.Launch(psp.LaunchRequest{VM: "a", Cert: c, Header: h, FirmwarePath: w.Firmware, ASID: 4})
	must(t, err)
	if l.ASID != 4 {
		t.Fatal(l.ASID)
	}
	if _, err := p.Launch(psp.LaunchRequest{VM: "b", Cert: c, Header: h, FirmwarePath: w.Firmware, ASID: 4}); !errors.Is(err, psp.ErrASIDInUse) || !strings.Contains(err.Error(), `"a"`) {
		t.Fatal(err)
	}
	if _, err := p.Launch(psp.LaunchRequest{VM: "b", Cert: c, Header: h, FirmwarePath: w.Firmware, ASID: 5}); !errors.Is(err, psp.ErrASIDRange) {
		t.Fatal(err)
	}
	// Automatic allocation skips the explicitly taken ASID.
	l, err = p.Launch(psp.LaunchRequest{VM: "c", Cert: c, Header: h, FirmwarePath: w.Firmware})
	must(t, err)
	if l.ASID != 1 {
		t.Fatal(l.ASID)
	}
	if p.MaxASIDs() != 4 || open(t, w.ChipDir, nil, 0).MaxASIDs() != psp.DefaultASIDs {
		t.Fatal("pool size")
	}
}

func TestRemoteKey(t *testing.T) {
	w := newWorld(t, format.KEMMLKEM768X25519, format.SigECDSAP384)
	c, h, _ := w.issue(t, func(r *req) {
		r.BrokerURL, r.KeyID, r.ImageKey = "https://broker.example/v1", "k1", nil
	})
	b := &binder{}
	p := open(t, w.ChipDir, b, 1)
	if _, err := p.UnsealImageKey(c, h); !errors.Is(err, psp.ErrRemoteKey) || !strings.Contains(err.Error(), "https://broker.example/v1") {
		t.Fatal(err)
	}
	if _, err := p.Launch(psp.LaunchRequest{VM: "vm", Cert: c, Header: h, FirmwarePath: w.Firmware}); !errors.Is(err, psp.ErrRemoteKey) {
		t.Fatal(err)
	}
	if b.loadCount() != 0 || len(p.Launches()) != 0 {
		t.Fatal("a remote-key refusal bound a key")
	}
	launchFits(t, w, p)
}

// launchFits checks that p's one-ASID pool is free: a valid launch succeeds.
func launchFits(t *testing.T, w *world, p *psp.PSP) {
	t.Helper()
	c, h, _ := w.issue(t, nil)
	l, err := p.Launch(psp.LaunchRequest{VM: "fits", Cert: c, Header: h, FirmwarePath: w.Firmware})
	if err != nil {
		t.Fatal("the refusal kept an ASID:", err)
	}
	must(t, p.Detach(l.ASID))
}

// TestKeyUnseal lifts the sealed key of one image into another image's certificate, signed
// by the same trusted provider: everything verifies until HPKE open, whose info binds the
// first image's UUID.
func TestKeyUnseal(t *testing.T) {
	w := newWorld(t, format.KEMMLKEM768X25519, format.SigECDSAP384)
	s := w.signer(t)
	a, _, _ := w.issue(t, nil)
	b, h, _ := w.issue(t, nil)
	b.SealedKey = a.SealedKey
	lifted, err := provider.Resign(s, b)
	must(t, err)
	bd := &binder{}
	p := open(t, w.ChipDir, bd, 1)
	if _, err := p.VerifyCertificate(lifted, h); err != nil {
		t.Fatal("steps 2–6 should pass:", err)
	}
	if _, err := p.UnsealImageKey(lifted, h); !errors.Is(err, psp.ErrKeyUnseal) {
		t.Fatal(err)
	}
	if _, err := p.Launch(psp.LaunchRequest{VM: "vm", Cert: lifted, Header: h, FirmwarePath: w.Firmware}); !errors.Is(err, psp.ErrKeyUnseal) {
		t.Fatal(err)
	}
	if bd.loadCount() != 0 {
		t.Fatal("an unseal failure bound a key")
	}
	launchFits(t, w, p)

	// A certificate that claims another KEM than the chip's.
	c, h, _ := w.issue(t, nil)
	c.KEM = format.KEMDHKEMP384
	c, err = provider.Resign(s, c)
	must(t, err)
	if _, err := p.UnsealImageKey(c, h); !errors.Is(err, psp.ErrKeyUnseal) {
		t.Fatal(err)
	}
}

func TestLaunchBindDetach(t *testing.T) {
	w := newWorld(t, format.KEMDHKEMP384, format.SigEd25519)
	b := &binder{}
	p := open(t, w.ChipDir, b, 0)
	c, h, key := w.issue(t, func(r *req) {
		r.Suite, r.SectorSize, r.ReadOnly = format.SuiteChaCha20Poly1305, 512, true
	})
	l, err := p.Launch(psp.LaunchRequest{VM: "vm1", Cert: c, Header: h, FirmwarePath: w.Firmware})
	must(t, err)
	bd := b.bindings[l.ASID]
	if !bytes.Equal(b.key(l.ASID), key) || bd.Suite != format.SuiteChaCha20Poly1305 || bd.UUID != c.UUID ||
		bd.SectorSize != 512 || !bd.ReadOnly {
		t.Fatalf("binding %+v", bd)
	}
	if l.VM != "vm1" || l.CertDigest != sha512.Sum384(c.Bytes()) || !l.SignatureOK || l.UUID != c.UUID || l.Suite != c.Suite {
		t.Fatalf("launch record %+v", l)
	}
	if ls := p.Launches(); len(ls) != 1 || ls[0].ASID != l.ASID {
		t.Fatalf("Launches() = %v", ls)
	}
	// The caller's copy is not the PSP's record.
	l.Measurement[0] ^= 1
	if p.Launches()[0].Measurement[0] == l.Measurement[0] {
		t.Fatal("Launch returned the PSP's own record")
	}

	must(t, p.Detach(l.ASID))
	if b.key(l.ASID) != nil || len(b.cleared) != 1 || b.cleared[0] != l.ASID || len(p.Launches()) != 0 {
		t.Fatal("Detach did not clear the slot")
	}
	if err := p.Detach(l.ASID); !errors.Is(err, psp.ErrNoKeyBound) {
		t.Fatal(err)
	}
	if err := p.Detach(77); !errors.Is(err, psp.ErrNoKeyBound) {
		t.Fatal(err)
	}
	if len(b.violations) != 0 {
		t.Fatal(b.violations)
	}
}

func TestLaunchZeroisesKey(t *testing.T) {
	w := newWorld(t, format.KEMMLKEM768X25519, format.SigECDSAP384)
	b := &binder{keep: true}
	c, h, _ := w.issue(t, nil)
	l, err := open(t, w.ChipDir, b, 0).Launch(psp.LaunchRequest{VM: "vm", Cert: c, Header: h, FirmwarePath: w.Firmware})
	must(t, err)
	if k := b.key(l.ASID); len(k) != 32 || !bytes.Equal(k, make([]byte, 32)) {
		t.Fatalf("the PSP's key copy was not zeroised after LoadKey: %x", k)
	}
}

func TestBinderFailures(t *testing.T) {
	w := newWorld(t, format.KEMMLKEM768X25519, format.SigECDSAP384)
	c, h, _ := w.issue(t, nil)
	boom := errors.New("engine slot unavailable")

	b := &binder{loadErr: boom}
	p := open(t, w.ChipDir, b, 1)
	if _, err := p.Launch(psp.LaunchRequest{VM: "vm", Cert: c, Header: h, FirmwarePath: w.Firmware}); !errors.Is(err, boom) {
		t.Fatal(err)
	}
	b.loadErr = nil
	l, err := p.Launch(psp.LaunchRequest{VM: "vm", Cert: c, Header: h, FirmwarePath: w.Firmware})
	must(t, err) // the failed LoadKey released the only ASID

	// A failed ClearKey leaves the ASID bound: the engine may still hold the key.
	b.clearErr = boom
	if err := p.Detach(l.ASID); !errors.Is(err, boom) {
		t.Fatal(err)
	}
	if len(p.Launches()) != 1 {
		t.Fatal("failed ClearKey released the ASID")
	}
	b.clearErr = nil
	must(t, p.Detach(l.ASID))

	if _, err := open(t, w.ChipDir, nil, 0).Launch(psp.LaunchRequest{VM: "vm", Cert: c, Header: h, FirmwarePath: w.Firmware}); err == nil {
		t.Fatal("Launch without a binder succeeded")
	}
	if _, err := p.Launch(psp.LaunchRequest{VM: "vm", Header: h, FirmwarePath: w.Firmware}); err == nil {
		t.Fatal("Launch without a certificate succeeded")
	}
	if _, err := p.UnsealImageKey(c, nil); err == nil {
		t.Fatal("UnsealImageKey without a header succeeded")
	}
}

// TestDetachDuringBind: while the engine is loading a key, its ASID is neither detachable nor
// attestable nor listed, and is not given to another launch.
func TestDetachDuringBind(t *testing.T) {
	w := newWorld(t, format.KEMMLKEM768X25519, format.SigECDSAP384)
	b := &binder{}
	p := open(t, w.ChipDir, b, 2)
	c, h, _ := w.issue(t, nil)
	nonce := bytes.Repeat([]byte{9}, 16)
	var inner *psp.Launch
	b.onLoad = func(a psp.ASID) {
		b.onLoad = nil
		if err := p.Detach(a); !errors.Is(err, psp.ErrNoKeyBound) {
			t.Error("Detach during LoadKey:", err)
		}
		if _, err := p.Attest(a, nonce); !errors.Is(err, psp.ErrNoKeyBound) {
			t.Error("Attest during LoadKey:", err)
		}
		if len(p.Launches()) != 0 {
			t.Error("Launches lists a launch still binding")
		}
		var err error
		inner, err = p.Launch(psp.LaunchRequest{VM: "inner", Cert: c, Header: h, FirmwarePath: w.Firmware})
		must(t, err)
		if _, err := p.Launch(psp.LaunchRequest{VM: "x", Cert: c, Header: h, FirmwarePath: w.Firmware, ASID: a}); !errors.Is(err, psp.ErrASIDInUse) {
			t.Error("explicit ASID of a launch still binding:", err)
		}
	}
	outer, err := p.Launch(psp.LaunchRequest{VM: "outer", Cert: c, Header: h, FirmwarePath: w.Firmware})
	must(t, err)
	if outer.ASID == inner.ASID || len(p.Launches()) != 2 {
		t.Fatalf("outer %d inner %d", outer.ASID, inner.ASID)
	}
	must(t, p.Detach(outer.ASID))
	if len(b.violations) != 0 {
		t.Fatal(b.violations)
	}
}

// TestConcurrentLaunchDetach runs launches, detaches and attestations at once on a small pool
// (run with -race): the binder must never see a load on a bound slot or a clear of an empty one.
func TestConcurrentLaunchDetach(t *testing.T) {
	w := newWorld(t, format.KEMMLKEM768X25519, format.SigECDSAP384)
	b := &binder{}
	p := open(t, w.ChipDir, b, 3)
	c, h, _ := w.issue(t, nil)
	nonce := bytes.Repeat([]byte{1}, 16)
	var wg sync.WaitGroup
	for g := range 6 {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for i := range 15 {
				l, err := p.Launch(psp.LaunchRequest{VM: "vm", Cert: c, Header: h, FirmwarePath: w.Firmware})
				if errors.Is(err, psp.ErrASIDExhausted) {
					continue
				}
				if err != nil {
					t.Error(err)
					return
				}
				if _, err := p.Attest(l.ASID, nonce); err != nil {
					t.Error(err)
				}
				// Every other goroutine also tries to detach an ASID it does not own.
				if g%2 == 0 {
					if err := p.Detach(psp.ASID(1 + i%3)); err != nil && !errors.Is(err, psp.ErrNoKeyBound) {
						t.Error(err)
					}
				}
				if err := p.Detach(l.ASID); err != nil && !errors.Is(err, psp.ErrNoKeyBound) {
					t.Error(err)
				}
			}
		}()
	}
	wg.Wait()
	if len(b.violations) != 0 {
		t.Fatal(b.violations)
	}
	if n := len(p.Launches()); n != 0 {
		t.Fatalf("%d launches left bound", n)
	}
}

func TestMeasure(t *testing.T) {
	d := t.TempDir()
	abc := filepath.Join(d, "abc")
	must(t, os.WriteFile(abc, []byte("abc"), 0o644))
	m, err := psp.Measure(abc, format.MeasureSM3)
	must(t, err)
	// GB/T 32905-2016 example 1
	if want := "66c7f0f462eeedd9d1f2d46bdc10e4e24167c4875cf2f7a2297da02b8f4ba8e0"; hex.EncodeToString(m) != want {
		t.Fatalf("sm3(abc) = %x", m)
	}
	m, err = psp.Measure(abc, format.MeasureSHA384)
	must(t, err)
	// FIPS 180-2 example
	if want := "cb00753f45a35e8bb5a03d699ac65007272c32ab0eded1631a8b605a43ff5bed8086072ba1e7cc2358baeca134c825a7"; hex.EncodeToString(m) != want {
		t.Fatalf("sha384(abc) = %x", m)
	}
	// Larger than any copy buffer, not a multiple of the block size.
	big := bytes.Repeat([]byte("OVMF"), (1<<20)/4+3)
	f := filepath.Join(d, "big")
	must(t, os.WriteFile(f, big, 0o644))
	m, err = psp.Measure(f, format.MeasureSHA384)
	must(t, err)
	if sum := sha512.Sum384(big); !bytes.Equal(m, sum[:]) {
		t.Fatal("streamed SHA-384 differs")
	}
	if _, err := psp.Measure(abc, format.MeasureAlg(9)); err == nil {
		t.Fatal("unknown algorithm accepted")
	}
	if _, err := psp.Measure(filepath.Join(d, "none"), format.MeasureSHA384); err == nil {
		t.Fatal("missing file measured")
	}
}

func TestLaunchSM3(t *testing.T) {
	w := newWorld(t, format.KEMMLKEM768X25519, format.SigECDSAP384)
	m, err := psp.Measure(w.Firmware, format.MeasureSM3)
	must(t, err)
	c, h, _ := w.issue(t, func(r *req) { r.MeasureAlg, r.Measurements = format.MeasureSM3, [][]byte{m} })
	l, err := open(t, w.ChipDir, &binder{}, 0).Launch(psp.LaunchRequest{VM: "vm", Cert: c, Header: h, FirmwarePath: w.Firmware})
	must(t, err)
	if l.MeasureAlg != format.MeasureSM3 || !bytes.Equal(l.Measurement, m) {
		t.Fatalf("%+v", l)
	}
}
