package psp

import (
	"bytes"
	"context"
	"fmt"
	"log/slog"
	"slices"
	"sync"
	"time"

	"github.com/sealdisk/sealdisk/format"
)

// The key cache holds remote image keys the broker released (remote.go), so that VMs sharing
// a key do not each ask the broker, and so that VMs keep serving while the broker is briefly
// down. A key lives until its lease ends, then it is zeroised and the engine slots of the VMs
// using it are cleared (they fail I/O with a permission error until detached); it is also
// zeroised when the last VM using it detaches. Before the lease ends the cache renews it
// through one of those VMs' launches; a refused renewal (a revoked key) lets the lease run out.

// renewAt is the share of a lease after which the cache starts renewing it.
const renewAt = 2.0 / 3

// minLease is the least lease a cached key must have left to be given to a new launch.
const minLease = time.Second

type remoteRef struct {
	url, keyID string
	uuid       [16]byte
}

// keyEntry is one release. Until ready is closed only the fetching goroutine touches rel and
// err; after that keyCache.mu guards every field.
type keyEntry struct {
	ref     remoteRef
	cert    []byte // the certificate the key was fetched for, for renewal
	ready   chan struct{}
	err     error
	rel     *openedRelease
	users   map[ASID]struct{} // bound launches using the key
	pending int               // launches between acquire and bind
	timer   *time.Timer       // renewal, then expiry
	gone    bool              // zeroised
}

type keyCache struct {
	mu      sync.Mutex // guards entries, byASID and the entries' fields (see keyEntry)
	entries map[remoteRef][]*keyEntry
	byASID  map[ASID]*keyEntry
}

// acquire returns a copy of the key for launch l (bound to nothing yet) and its entry: a
// cached release whose scope covers l, the result of a fetch another launch has in flight
// (single flight), or a new fetch. The caller zeroises the copy and calls bind or drop.
func (p *PSP) acquire(c *format.Certificate, l *Launch) ([]byte, *keyEntry, error) {
	kc := &p.keys
	ref := remoteRef{c.BrokerURL, c.KeyID, c.UUID}
	kc.mu.Lock()
	if kc.entries == nil {
		kc.entries, kc.byASID = map[remoteRef][]*keyEntry{}, map[ASID]*keyEntry{}
	}
	for _, e := range slices.Clone(kc.entries[ref]) {
		if e.gone {
			continue
		}
		e.pending++
		if e.rel == nil && e.err == nil {
			kc.mu.Unlock()
			<-e.ready
			kc.mu.Lock()
			if e.err != nil {
				// The broker refused or was unreachable a moment ago, after its retries: the
				// waiters share the verdict rather than each trying again.
				err := e.err
				e.pending--
				kc.mu.Unlock()
				return nil, nil, err
			}
		}
		if !e.gone && e.rel.covers(l) && p.now().Add(minLease).Before(e.rel.leaseEnd) {
			k := bytes.Clone(e.rel.key)
			kc.mu.Unlock()
			return k, e, nil
		}
		e.pending--
		kc.dropLocked(e)
	}
	e := &keyEntry{ref: ref, cert: c.Bytes(), ready: make(chan struct{}), users: map[ASID]struct{}{}, pending: 1}
	kc.entries[ref] = append(kc.entries[ref], e)
	kc.mu.Unlock()

	rel, err := p.fetchRemote(ref, e.cert, l)
	kc.mu.Lock()
	defer kc.mu.Unlock()
	e.rel, e.err = rel, err
	close(e.ready)
	if err != nil {
		e.pending--
		kc.removeLocked(e)
		return nil, nil, err
	}
	p.scheduleLocked(e, p.now())
	return bytes.Clone(rel.key), e, nil
}

// fetchRemote asks the broker for ref's key on behalf of launch l.
func (p *PSP) fetchRemote(ref remoteRef, cert []byte, l *Launch) (*openedRelease, error) {
	if p.fetcher == nil {
		return nil, fmt.Errorf("%w (broker %s, key %s): this PSP has no broker client configured", ErrRemoteKey, ref.url, ref.keyID)
	}
	var nonce []byte
	ctx, cancel := context.WithTimeout(context.Background(), p.fetchTimeout)
	defer cancel()
	rel, err := p.fetcher.FetchKey(ctx, KeyRequest{
		BrokerURL: ref.url, KeyID: ref.keyID, Cert: cert,
		Attest: func(n []byte) ([]byte, error) {
			if err := checkNonce(n); err != nil {
				return nil, fmt.Errorf("failed to attest for broker %s: %w", ref.url, err)
			}
			nonce = bytes.Clone(n)
			return p.sign(l, n)
		},
	})
	if err != nil {
		return nil, fmt.Errorf("failed to fetch remote key: %w", err)
	}
	o, err := p.openRelease(rel, ref.uuid, ref.keyID, nonce)
	if err != nil {
		return nil, fmt.Errorf("failed to use the key from broker %s: %w", ref.url, err)
	}
	return o, nil
}

// bind records that asid (now bound in the engine) uses e's key; false if the lease ended
// meanwhile, in which case the caller detaches asid.
func (p *PSP) bindKey(e *keyEntry, asid ASID) bool {
	kc := &p.keys
	kc.mu.Lock()
	defer kc.mu.Unlock()
	e.pending--
	if e.gone || !p.now().Before(e.rel.leaseEnd) {
		kc.dropLocked(e)
		return false
	}
	e.users[asid] = struct{}{}
	kc.byASID[asid] = e
	return true
}

// dropKey undoes an acquire whose launch failed before bind.
func (p *PSP) dropKey(e *keyEntry) {
	p.keys.mu.Lock()
	defer p.keys.mu.Unlock()
	e.pending--
	p.keys.dropLocked(e)
}

// unbindKey forgets asid's use of a remote key (Detach); the key is zeroised with its last user.
func (p *PSP) unbindKey(asid ASID) {
	kc := &p.keys
	kc.mu.Lock()
	defer kc.mu.Unlock()
	e := kc.byASID[asid]
	if e == nil {
		return
	}
	delete(kc.byASID, asid)
	delete(e.users, asid)
	kc.dropLocked(e)
}

// dropLocked zeroises and forgets e once nothing uses or waits for it.
func (kc *keyCache) dropLocked(e *keyEntry) {
	if e.gone || len(e.users) > 0 || e.pending > 0 || e.rel == nil {
		return
	}
	kc.zeroLocked(e)
}

func (kc *keyCache) zeroLocked(e *keyEntry) {
	e.gone = true
	zero(e.rel.key)
	if e.timer != nil {
		e.timer.Stop()
	}
	kc.removeLocked(e)
}

func (kc *keyCache) removeLocked(e *keyEntry) {
	kc.entries[e.ref] = slices.DeleteFunc(kc.entries[e.ref], func(x *keyEntry) bool { return x == e })
	if len(kc.entries[e.ref]) == 0 {
		delete(kc.entries, e.ref)
	}
}

// scheduleLocked arms e's timer: renewal at renewAt of the lease left from now, expiry at
// the lease end.
func (p *PSP) scheduleLocked(e *keyEntry, from time.Time) {
	left := e.rel.leaseEnd.Sub(from)
	wait := time.Duration(float64(left) * renewAt)
	if e.timer != nil {
		e.timer.Stop()
	}
	e.timer = time.AfterFunc(wait, func() { p.renew(e) })
}

// renew fetches e's key again through one of its users' launches. Success moves the lease
// end; failure retries at half the time left; at the lease end the key expires.
func (p *PSP) renew(e *keyEntry) {
	kc := &p.keys
	kc.mu.Lock()
	if e.gone {
		kc.mu.Unlock()
		return
	}
	now := p.now()
	if !now.Before(e.rel.leaseEnd) {
		p.expireLocked(e)
		return
	}
	var l *Launch
	for a := range e.users {
		if l = p.bound(a); l != nil {
			break
		}
	}
	kc.mu.Unlock()
	if l == nil {
		kc.mu.Lock()
		p.retryLocked(e, now)
		kc.mu.Unlock()
		return
	}
	rel, err := p.fetchRemote(e.ref, e.cert, l)
	kc.mu.Lock()
	switch {
	case e.gone:
		kc.mu.Unlock()
	case err != nil:
		p.log.Warn("remote key renewal failed; the attached VMs keep the key until the lease ends",
			"broker", e.ref.url, "key_id", e.ref.keyID, "lease_end", e.rel.leaseEnd.Format(time.RFC3339), "error", err)
		p.retryLocked(e, p.now())
		kc.mu.Unlock()
	case !bytes.Equal(rel.key, e.rel.key):
		zero(rel.key)
		p.log.Error("broker renewed the lease with a different key; keeping the current one until its lease ends",
			"broker", e.ref.url, "key_id", e.ref.keyID)
		p.retryLocked(e, p.now())
		kc.mu.Unlock()
	default:
		zero(rel.key)
		e.rel.leaseEnd, e.rel.vms, e.rel.ms = rel.leaseEnd, rel.vms, rel.ms
		p.scheduleLocked(e, p.now())
		kc.mu.Unlock()
		p.log.Info("remote key lease renewed", "broker", e.ref.url, "key_id", e.ref.keyID, "lease_end", rel.leaseEnd.Format(time.RFC3339))
	}
}

// retryLocked re-arms e: another renewal at half the lease left (at least 100 ms), or
// expiry at the end.
func (p *PSP) retryLocked(e *keyEntry, now time.Time) {
	left := e.rel.leaseEnd.Sub(now)
	wait := max(left/2, 100*time.Millisecond)
	if wait >= left {
		wait = max(left, 0)
	}
	e.timer = time.AfterFunc(wait, func() { p.renew(e) })
}

// expireLocked zeroises e and clears the engine slots of its users; it unlocks kc.mu.
func (p *PSP) expireLocked(e *keyEntry) {
	kc := &p.keys
	users := make([]ASID, 0, len(e.users))
	for a := range e.users {
		users = append(users, a)
		delete(kc.byASID, a)
	}
	clear(e.users)
	kc.zeroLocked(e)
	kc.mu.Unlock()
	for _, a := range users {
		p.expireSlot(a, e.ref)
	}
}

// expireSlot clears a bound ASID's engine key because its lease ended; the ASID stays
// allocated (slotExpired) until Detach, so no other VM is given it while its disk is attached.
func (p *PSP) expireSlot(a ASID, ref remoteRef) {
	p.mu.Lock()
	s, ok := p.slots[a]
	if !ok || s.state != slotBound {
		p.mu.Unlock()
		return
	}
	s.state = slotClearing
	p.mu.Unlock()
	err := p.binder.ClearKey(a)
	p.mu.Lock()
	if err != nil {
		s.state = slotBound
	} else {
		s.state = slotExpired
	}
	p.mu.Unlock()
	if err != nil {
		p.log.Error("failed to clear an expired remote key from the engine", "asid", a, "error", err)
		return
	}
	p.log.Warn("remote key lease ended: the VM's key is cleared until it is detached and attached again",
		"vm", s.launch.VM, "asid", a, "broker", ref.url, "key_id", ref.keyID)
	if p.onLeaseEnd != nil {
		p.onLeaseEnd(a, s.launch.VM)
	}
}

// discardLogger is the PSP's logger when Options.Logger is nil.
var discardLogger = slog.New(slog.DiscardHandler)
