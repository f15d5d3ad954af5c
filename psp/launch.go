package psp

import (
	"bytes"
	"encoding/hex"
	"errors"
	"fmt"
	"sort"
	"time"

	"github.com/sealdisk/sealdisk/format"
)

// Launches: admitting a VM's disk (FORMAT.md §3.4), the ASID pool and its slots, detach.

// slotState is where an allocated ASID is in its life. Binder calls happen outside p.mu, so
// the states in between keep a concurrent Detach, Attest or Launch off a slot that is being
// loaded or cleared.
type slotState int

const (
	slotBinding  slotState = iota // reserved; LoadKey not yet returned
	slotBound                     // key loaded: attestable, detachable
	slotClearing                  // Detach is in ClearKey
	slotExpired                   // its remote key's lease ended: key cleared, ASID still held
)

type slot struct {
	state  slotState
	launch Launch // the PSP's own record; callers get copies
}

// LaunchRequest asks the PSP to admit a VM's disk.
type LaunchRequest struct {
	VM           string
	Cert         *format.Certificate
	Header       *format.Header
	FirmwarePath string
	ASID         ASID // 0 = allocate; for Disk > 0 the VM's ASID, which its disk 0 holds
	// Disk is the disk's index in its VM: 0 allocates the VM's ASID (its key slot is the
	// ASID's own), N in 1..MaxDisks-1 takes key slot KeySlot(ASID, N) under the ASID that
	// disk 0 of the same VM holds.
	Disk int
}

// MaxDisks bounds the key slots under one ASID: a VM's disks, its NVRAM included.
const MaxDisks = 16

// diskShift puts a disk's index above every ASID of the pool (at most 65536) in its key
// slot's number.
const diskShift = 20

// KeySlot is the engine key slot of disk n of the VM at ASID a: a itself for disk 0, a with n
// above the pool's bits for the others, so one VM's disks each have their own key under its
// ASID, and no slot of one VM is another VM's.
func KeySlot(a ASID, n int) ASID {
	if n < 0 || n >= MaxDisks || a >= 1<<diskShift {
		panic(fmt.Sprintf("BUG: psp: no key slot for disk %d of ASID %d", n, a))
	}
	return a | ASID(n)<<diskShift
}

// Launch is an admitted VM disk: what the PSP checked, for attestation.
type Launch struct {
	VM          string
	ASID        ASID // the VM's
	Disk        int  // the disk's index in the VM
	Slot        ASID // the engine key slot: KeySlot(ASID, Disk); Detach takes it
	Measurement []byte
	MeasureAlg  format.MeasureAlg
	FirmwareOK  bool
	SignatureOK bool
	CertDigest  [48]byte // SHA-384 of the certificate bytes
	Suite       format.Suite
	UUID        [16]byte
	Time        time.Time
}

func (l Launch) clone() *Launch {
	l.Measurement = bytes.Clone(l.Measurement)
	return &l
}

// Launch runs FORMAT.md §3.4 in order: verify (2–6), measure firmware (7; on a mismatch no
// key is unwrapped and the engine is not touched), allocate an ASID, unseal (8), bind the key
// into the engine, zeroise the PSP's copy. Every refusal leaves no ASID allocated.
func (p *PSP) Launch(req LaunchRequest) (*Launch, error) {
	if p.binder == nil {
		return nil, errors.New("failed to launch: this PSP has no engine to bind keys into")
	}
	if req.Cert == nil || req.Header == nil {
		return nil, errors.New("failed to launch: a certificate and the image header are required")
	}
	v, err := p.VerifyCertificate(req.Cert, req.Header)
	if err != nil {
		return nil, err
	}
	m, err := checkFirmware(req.Cert, req.FirmwarePath)
	if err != nil {
		return nil, err
	}
	l := Launch{
		VM: req.VM, Measurement: m, MeasureAlg: req.Cert.MeasureAlg, FirmwareOK: true,
		SignatureOK: v.Signature == "valid", CertDigest: v.CertDigest, Suite: req.Cert.Suite,
		UUID: req.Cert.UUID, Time: p.now().UTC(),
	}
	var asid ASID // the key slot
	if req.Disk == 0 {
		asid, err = p.reserve(req.ASID, l)
	} else {
		asid, err = p.reserveDisk(req.ASID, req.Disk, l)
	}
	if err != nil {
		return nil, err
	}
	roots, err := p.rootsFor(req.Cert)
	if err != nil {
		p.release(asid)
		return nil, err
	}
	var key []byte
	var remote *keyEntry
	if req.Cert.Remote {
		// The report the broker sees is the PSP's own record of this launch, checked up to
		// here: certificate, image and firmware (remote.go).
		key, remote, err = p.acquire(req.Cert, p.reserved(asid))
	} else {
		key, err = p.unseal(req.Cert)
	}
	if err != nil {
		p.release(asid)
		return nil, err
	}
	err = p.binder.LoadKey(asid, Binding{
		Suite: req.Cert.Suite, Key: key, UUID: req.Cert.UUID,
		SectorSize: int(req.Cert.SectorSize), ReadOnly: req.Cert.ReadOnly, Roots: roots,
	})
	zero(key)
	if err != nil {
		if remote != nil {
			p.dropKey(remote)
		}
		p.release(asid)
		return nil, fmt.Errorf("failed to bind key to ASID %d: %w", asid, err)
	}
	p.mu.Lock()
	s := p.slots[asid]
	if s == nil || s.state != slotBinding {
		panic(fmt.Sprintf("BUG: psp: ASID %d changed state while its key was being loaded", asid))
	}
	s.state = slotBound
	out := s.launch.clone()
	p.mu.Unlock()
	if remote != nil && !p.bindKey(remote, asid) {
		return nil, errors.Join(fmt.Errorf("failed to launch VM %q: %w (broker %s, key %s) while it was being bound",
			req.VM, ErrLeaseEnded, req.Cert.BrokerURL, req.Cert.KeyID), p.Detach(asid))
	}
	return out, nil
}

// reserve allocates want (0: the lowest free ASID) in state slotBinding.
func (p *PSP) reserve(want ASID, l Launch) (ASID, error) {
	p.mu.Lock()
	defer p.mu.Unlock()
	if want == 0 {
		for a := ASID(1); int(a) <= p.maxASIDs; a++ {
			if _, busy := p.slots[a]; !busy {
				want = a
				break
			}
		}
		if want == 0 {
			return 0, fmt.Errorf("%w: all %d ASIDs are bound", ErrASIDExhausted, p.maxASIDs)
		}
	} else {
		if int64(want) > int64(p.maxASIDs) {
			return 0, fmt.Errorf("%w: ASID %d is not in 1..%d", ErrASIDRange, want, p.maxASIDs)
		}
		if s, busy := p.slots[want]; busy {
			return 0, fmt.Errorf("%w: ASID %d is held by VM %q", ErrASIDInUse, want, s.launch.VM)
		}
	}
	l.ASID, l.Slot = want, want
	p.slots[want] = &slot{state: slotBinding, launch: l}
	return want, nil
}

// reserveDisk allocates disk n's key slot under ASID a, in state slotBinding: a must be bound
// to the same VM (its disk 0), so no VM puts a key under another VM's ASID.
func (p *PSP) reserveDisk(a ASID, n int, l Launch) (ASID, error) {
	if n < 1 || n >= MaxDisks {
		return 0, fmt.Errorf("%w: disk %d is not in 1..%d", ErrASIDRange, n, MaxDisks-1)
	}
	if a == 0 || int64(a) > int64(p.maxASIDs) {
		return 0, fmt.Errorf("%w: disk %d of VM %q: ASID %d is not in 1..%d", ErrASIDRange, n, l.VM, a, p.maxASIDs)
	}
	p.mu.Lock()
	defer p.mu.Unlock()
	if base := p.slots[a]; base == nil || base.state != slotBound || base.launch.VM != l.VM {
		return 0, fmt.Errorf("failed to launch disk %d of VM %q: %w: ASID %d is not bound to that VM's first disk", n, l.VM, ErrNoKeyBound, a)
	}
	ks := KeySlot(a, n)
	if s, busy := p.slots[ks]; busy {
		return 0, fmt.Errorf("%w: disk %d of ASID %d is held by VM %q", ErrASIDInUse, n, a, s.launch.VM)
	}
	l.ASID, l.Disk, l.Slot = a, n, ks
	p.slots[ks] = &slot{state: slotBinding, launch: l}
	return ks, nil
}

// reserved returns a copy of the launch record of an ASID in slotBinding.
func (p *PSP) reserved(a ASID) *Launch {
	p.mu.Lock()
	defer p.mu.Unlock()
	return p.slots[a].launch.clone()
}

func (p *PSP) release(a ASID) {
	p.mu.Lock()
	delete(p.slots, a)
	p.mu.Unlock()
}

// Detach clears the engine key slot a (a Launch's Slot) and frees it; a VM's ASID is freed
// with its disk 0's slot, which is refused while another disk of the VM holds a slot under
// it. A slot whose launch has not finished binding, or which another Detach is clearing, is
// not bound yet/any more: ErrNoKeyBound.
func (p *PSP) Detach(a ASID) error {
	p.mu.Lock()
	if a < 1<<diskShift {
		for n := 1; n < MaxDisks; n++ {
			if o, held := p.slots[KeySlot(a, n)]; held {
				p.mu.Unlock()
				return fmt.Errorf("failed to detach ASID %d: disk %d of VM %q still has a key slot under it; detach it first", a, n, o.launch.VM)
			}
		}
	}
	s, ok := p.slots[a]
	if ok && s.state == slotExpired {
		// The lease's end already cleared the engine slot and forgot the ASID's key.
		delete(p.slots, a)
		p.mu.Unlock()
		return nil
	}
	if !ok || s.state != slotBound {
		p.mu.Unlock()
		return fmt.Errorf("failed to detach: %w: ASID %d", ErrNoKeyBound, a)
	}
	s.state = slotClearing
	p.mu.Unlock()
	if err := p.binder.ClearKey(a); err != nil {
		// The engine may still hold the key: keep the ASID bound so the caller can retry
		// and so no other VM is given a slot that is not clean.
		p.mu.Lock()
		s.state = slotBound
		p.mu.Unlock()
		return fmt.Errorf("failed to clear key slot %d: %w", a, err)
	}
	// Before release: once released, a may carry another launch's key.
	p.unbindKey(a)
	p.release(a)
	return nil
}

// Launches lists the bound launches by ASID (copies).
func (p *PSP) Launches() []*Launch {
	p.mu.Lock()
	defer p.mu.Unlock()
	out := make([]*Launch, 0, len(p.slots))
	for _, s := range p.slots {
		if s.state == slotBound {
			out = append(out, s.launch.clone())
		}
	}
	sort.Slice(out, func(i, j int) bool { return out[i].ASID < out[j].ASID })
	return out
}

// bound returns a copy of the launch bound to a, or nil.
func (p *PSP) bound(a ASID) *Launch {
	p.mu.Lock()
	defer p.mu.Unlock()
	if s, ok := p.slots[a]; ok && s.state == slotBound {
		return s.launch.clone()
	}
	return nil
}

// checkFirmware measures the firmware file with the certificate's algorithm (FORMAT.md §3.4
// step 7) and returns the measurement if the certificate allows it.
func checkFirmware(c *format.Certificate, path string) ([]byte, error) {
	m, err := Measure(path, c.MeasureAlg)
	if err != nil {
		return nil, err
	}
	for _, want := range c.Measurements {
		if bytes.Equal(m, want) {
			return m, nil
		}
	}
	return nil, fmt.Errorf("%w: %s %s of %s is not among the certificate's %d allowed measurements",
		ErrFirmwareMismatch, c.MeasureAlg, hex.EncodeToString(m), path, len(c.Measurements))
}

// UnsealStateKey opens the key of a saved VM state (package statefile) for a restore: the
// certificate verified as an image's (steps 2–5), the firmware the restored VM runs measured
// against it (step 7), then the key unwrapped (step 8). The caller has checked that the
// certificate is the state file's (statefile.Header.CheckCertificate) and zeroises the key.
func (p *PSP) UnsealStateKey(c *format.Certificate, firmwarePath string) ([]byte, error) {
	if _, err := p.VerifyCertificate(c, nil); err != nil {
		return nil, err
	}
	if _, err := checkFirmware(c, firmwarePath); err != nil {
		return nil, err
	}
	return p.unseal(c)
}
