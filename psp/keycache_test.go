package psp_test

import (
	"bytes"
	"context"
	"crypto/rand"
	"encoding/hex"
	"errors"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/sealdisk/sealdisk/internal/fixture"
	"github.com/sealdisk/sealdisk/psp"
)

// fakeBroker releases one key the way the broker does (psp.SealRelease to the attested chip),
// after checking the report over its own nonce; it counts fetches and can be made to fail or
// to wait.
type fakeBroker struct {
	w     *fixture.World
	key   []byte
	lease time.Duration

	// grant changes the grant before it is sealed; tamper changes the release after.
	grant  func(*psp.Grant)
	tamper func(*psp.Release)

	mu    sync.Mutex // guards calls, fail, gate
	calls int
	fail  error
	gate  chan struct{}
}

func (f *fakeBroker) FetchKey(_ context.Context, req psp.KeyRequest) (*psp.Release, error) {
	f.mu.Lock()
	f.calls++
	fail, gate := f.fail, f.gate
	f.mu.Unlock()
	if gate != nil {
		<-gate
	}
	if fail != nil {
		return nil, fail
	}
	nonce := make([]byte, 32)
	rand.Read(nonce)
	rep, err := req.Attest(nonce)
	if err != nil {
		return nil, err
	}
	body, err := psp.VerifyReport(rep, psp.RootPool(f.w.PSP.Vendor()), nonce)
	if err != nil {
		return nil, err
	}
	g := psp.Grant{
		KeyID: req.KeyID, ImageUUID: body.ImageUUID, ChipID: body.ChipID, Nonce: hex.EncodeToString(nonce),
		LeaseEnd: time.Now().Add(f.lease).UTC().Format(time.RFC3339),
	}
	if f.grant != nil {
		f.grant(&g)
	}
	rel, err := psp.SealRelease(f.w.Chip, g, f.key)
	if err == nil && f.tamper != nil {
		f.tamper(rel)
	}
	return rel, err
}

func (f *fakeBroker) count() int {
	f.mu.Lock()
	defer f.mu.Unlock()
	return f.calls
}

func (f *fakeBroker) set(fail error, gate chan struct{}) {
	f.mu.Lock()
	f.fail, f.gate = fail, gate
	f.mu.Unlock()
}

type remoteWorld struct {
	w  *fixture.World
	fb *fakeBroker
	b  *binder
	p  *psp.PSP
	im *fixture.Image
	fw string
}

func newRemote(t *testing.T, lease time.Duration, readOnly bool) *remoteWorld {
	t.Helper()
	w := fixture.New(t)
	im := w.Image(t, fixture.Spec{Size: 1 << 20, Measurements: [][]byte{w.FirmwareDigest}, ReadOnly: readOnly, BrokerURL: "https://broker.test:8443", KeyID: "disk-1"})
	fb := &fakeBroker{w: w, key: im.Key, lease: lease}
	b := &binder{}
	p, err := psp.Open(w.ChipDir, psp.Options{Binder: b, Fetcher: fb})
	must(t, err)
	return &remoteWorld{w: w, fb: fb, b: b, p: p, im: im, fw: w.Firmware}
}

func (r *remoteWorld) launch(vm string) (*psp.Launch, error) {
	return r.p.Launch(psp.LaunchRequest{VM: vm, Cert: r.im.Cert, Header: r.im.Header, FirmwarePath: r.fw})
}

// TestRemoteKeySingleFlight: VMs attaching one image at once make one fetch; a later attach
// inside the lease makes none; both get the broker's key.
func TestRemoteKeySingleFlight(t *testing.T) {
	r := newRemote(t, time.Minute, true)
	gate := make(chan struct{})
	r.fb.set(nil, gate)
	var wg sync.WaitGroup
	ls := make([]*psp.Launch, 3)
	errs := make([]error, 3)
	for i := range 3 {
		wg.Add(1)
		go func() { defer wg.Done(); ls[i], errs[i] = r.launch("vm" + string(rune('a'+i))) }()
	}
	for r.fb.count() == 0 {
		time.Sleep(time.Millisecond)
	}
	time.Sleep(100 * time.Millisecond) // the others are waiting on the fetch in flight
	close(gate)
	wg.Wait()
	for i := range 3 {
		must(t, errs[i])
		if !bytes.Equal(r.b.key(ls[i].ASID), r.im.Key) {
			t.Fatalf("VM %d was not given the broker's key", i)
		}
	}
	if n := r.fb.count(); n != 1 {
		t.Fatalf("%d fetches for three concurrent attaches, want 1", n)
	}
	l, err := r.launch("vm-late")
	must(t, err)
	if n := r.fb.count(); n != 1 || l == nil {
		t.Fatalf("an attach within the lease fetched again (%d fetches)", n)
	}
}

// TestRemoteKeyZeroisedOnDetach: the cache's copy is zeroised when the last VM using it
// detaches, and the next attach fetches again.
func TestRemoteKeyZeroisedOnDetach(t *testing.T) {
	r := newRemote(t, time.Minute, true)
	l1, err := r.launch("vm1")
	must(t, err)
	l2, err := r.launch("vm2")
	must(t, err)
	keys := psp.CachedKeys(r.p)
	if len(keys) != 1 || !bytes.Equal(keys[0], r.im.Key) {
		t.Fatalf("cache holds %d keys", len(keys))
	}
	must(t, r.p.Detach(l1.ASID))
	if bytes.Equal(keys[0], make([]byte, 32)) {
		t.Fatal("key zeroised while vm2 still uses it")
	}
	must(t, r.p.Detach(l2.ASID))
	if !bytes.Equal(keys[0], make([]byte, 32)) {
		t.Fatal("the cache's key was not zeroised at the last detach")
	}
	if len(psp.CachedKeys(r.p)) != 0 {
		t.Fatal("entry kept after the last detach")
	}
	_, err = r.launch("vm3")
	must(t, err)
	if r.fb.count() != 2 {
		t.Fatalf("%d fetches, want 2", r.fb.count())
	}
}

// TestRemoteKeyBrokerDown: a new attach fails with the fetcher's error and leaves no ASID;
// an attached VM keeps its key while renewals fail, until the lease ends: then its engine
// slot is cleared, the cache zeroised, and Detach still frees the ASID.
func TestRemoteKeyBrokerDown(t *testing.T) {
	r := newRemote(t, 3*time.Second, false)
	l, err := r.launch("vm1")
	must(t, err)
	keys := psp.CachedKeys(r.p)
	down := errors.New("broker https://broker.test:8443 unreachable after 4 attempts")
	r.fb.set(down, nil)
	// A second image's attach while the broker is down.
	im2 := r.w.Image(t, fixture.Spec{Size: 1 << 20, Measurements: r.im.Cert.Measurements, BrokerURL: "https://broker.test:8443", KeyID: "disk-2"})
	_, err = r.p.Launch(psp.LaunchRequest{VM: "vm2", Cert: im2.Cert, Header: im2.Header, FirmwarePath: r.fw})
	if !errors.Is(err, down) || !strings.Contains(err.Error(), "broker.test") {
		t.Fatalf("attach with the broker down: %v", err)
	}
	if len(r.p.Launches()) != 1 {
		t.Fatal("a failed attach kept its ASID")
	}
	time.Sleep(time.Second)
	if r.b.key(l.ASID) == nil {
		t.Fatal("the attached VM lost its key before the lease ended")
	}
	deadline := time.Now().Add(5 * time.Second)
	for r.b.key(l.ASID) != nil && time.Now().Before(deadline) {
		time.Sleep(20 * time.Millisecond)
	}
	if r.b.key(l.ASID) != nil {
		t.Fatal("the engine slot was not cleared at the lease end")
	}
	if r.fb.count() < 3 {
		t.Fatalf("%d fetches: renewal was not retried", r.fb.count())
	}
	if !bytes.Equal(keys[0], make([]byte, 32)) {
		t.Fatal("the cache's key was not zeroised at the lease end")
	}
	if _, err := r.p.Attest(l.ASID, make([]byte, 32)); !errors.Is(err, psp.ErrNoKeyBound) {
		t.Fatalf("attest after the lease: %v", err)
	}
	must(t, r.p.Detach(l.ASID))
	if len(r.p.Launches()) != 0 {
		t.Fatal("ASID still held")
	}
}

// TestRemoteKeyRenewal: with the broker up, the lease is renewed before its end and the VM
// keeps its key past the first lease.
func TestRemoteKeyRenewal(t *testing.T) {
	r := newRemote(t, 2*time.Second, false)
	l, err := r.launch("vm1")
	must(t, err)
	time.Sleep(3500 * time.Millisecond)
	if r.b.key(l.ASID) == nil {
		t.Fatal("key cleared although renewal should have succeeded")
	}
	if r.fb.count() < 2 {
		t.Fatalf("%d fetches: no renewal", r.fb.count())
	}
	must(t, r.p.Detach(l.ASID))
}

// TestRemoteKeyNoFetcher: without a broker client the remote path says so.
func TestRemoteKeyNoFetcher(t *testing.T) {
	r := newRemote(t, time.Minute, false)
	p, err := psp.Open(r.w.ChipDir, psp.Options{Binder: &binder{}})
	must(t, err)
	_, err = p.Launch(psp.LaunchRequest{VM: "vm1", Cert: r.im.Cert, Header: r.im.Header, FirmwarePath: r.fw})
	if !errors.Is(err, psp.ErrRemoteKey) {
		t.Fatalf("got %v", err)
	}
}

// TestRemoteKeyStaleRelease: a release whose lease has already ended is refused and binds
// nothing (a replayed old answer cannot hand a PSP a key past its lease).
func TestRemoteKeyStaleRelease(t *testing.T) {
	r := newRemote(t, -time.Second, false)
	_, err := r.launch("vm1")
	if !errors.Is(err, psp.ErrLeaseEnded) {
		t.Fatalf("got %v, want ErrLeaseEnded", err)
	}
	if r.b.loadCount() != 0 || len(r.p.Launches()) != 0 {
		t.Fatal("a stale release bound a key")
	}
}

// TestRemoteKeyReleaseChecks: a release for another nonce, image or key id, or whose grant was
// changed after sealing (a longer lease), is refused and binds nothing.
func TestRemoteKeyReleaseChecks(t *testing.T) {
	for name, c := range map[string]struct {
		grant  func(*psp.Grant)
		tamper func(*psp.Release)
		want   string
	}{
		"another nonce":  {grant: func(g *psp.Grant) { g.Nonce = strings.Repeat("00", 32) }, want: "another challenge"},
		"another image":  {grant: func(g *psp.Grant) { g.ImageUUID = "00000000-0000-4000-8000-000000000000" }, want: "for image"},
		"another key id": {grant: func(g *psp.Grant) { g.KeyID = "disk-9" }, want: "for key"},
		"a longer lease": {tamper: func(r *psp.Release) {
			r.Grant = bytes.Replace(r.Grant, []byte(`"lease_end":"20`), []byte(`"lease_end":"21`), 1)
		}, want: "HPKE open"},
		"a changed scope": {tamper: func(r *psp.Release) {
			r.Grant = bytes.Replace(r.Grant, []byte(`{"version":1,`), []byte(`{"version":1,"vms":["vm1"],`), 1)
		}, want: "HPKE open"},
		"another sealed key": {tamper: func(r *psp.Release) { r.SealedKey[len(r.SealedKey)-1] ^= 1 }, want: "HPKE open"},
	} {
		t.Run(name, func(t *testing.T) {
			r := newRemote(t, time.Minute, false)
			r.fb.grant, r.fb.tamper = c.grant, c.tamper
			_, err := r.launch("vm1")
			if !errors.Is(err, psp.ErrRelease) || !strings.Contains(err.Error(), c.want) {
				t.Fatalf("got %v, want ErrRelease with %q", err, c.want)
			}
			if r.b.loadCount() != 0 || len(r.p.Launches()) != 0 {
				t.Fatal("a bad release bound a key")
			}
		})
	}
}
