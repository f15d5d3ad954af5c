package engine

import (
	"bytes"
	"errors"
	"testing"

	"github.com/sealdisk/sealdisk/dma"
)

// TestDescriptorKeySlotChecked: the coprocessor checks each descriptor's ASID against the key
// slot of the disk it addresses (shard.check). A descriptor for disk A that names B's ASID (a
// loaded key, but not A's) or an ASID with no key is refused with ErrPermission and counted:
// the read returns none of A's plaintext, the write changes nothing. The same descriptor with
// A's own ASID goes through, so the refusals are the check's and not a malformed descriptor.
func TestDescriptorKeySlotChecked(t *testing.T) {
	imA := newTestImage(t, 1<<20, 4096, 0)
	imB := newTestImage(t, 1<<20, 4096, 0)
	stA, _ := fileStore(t, imA)
	stB, _ := fileStore(t, imB)
	e := New(Options{Shards: 2, StripeSectors: 64})
	defer e.Close()
	a := imA.attach(t, e, 3, stA)
	imB.attach(t, e, 4, stB)
	secret := bytes.Repeat([]byte("A's plaintext "), 4096/14+1)[:4096]
	must(t, a.WriteAt(ctx, secret, 0, false))
	must(t, a.Flush(ctx))

	// submit pushes one descriptor for sector 0 of a, with asid, on its shard's ring and waits
	// for its completion.
	submit := func(op dma.Op, asid uint32, buf []byte) error {
		done := make(chan *dma.Descriptor, 1)
		desc := &dma.Descriptor{Op: op, ASID: asid, LBA: 0, Count: 1, Len: uint32(len(buf)), Buf: buf,
			Target: a, Complete: func(d *dma.Descriptor) { done <- d }}
		if err := e.shards[a.shardOf(0)].sq.Push(desc); err != nil {
			t.Fatal(err)
		}
		return (<-done).Status
	}

	for _, asid := range []uint32{4, 9} { // B's key slot; no key slot at all
		denied := e.Stats.PermissionDenials.Load()
		buf := make([]byte, 4096)
		if err := submit(dma.OpRead, asid, buf); !errors.Is(err, ErrPermission) {
			t.Errorf("read of disk A under ASID %d: %v, want ErrPermission", asid, err)
		}
		if bytes.Contains(buf, []byte("A's plaintext")) {
			t.Errorf("read of disk A under ASID %d returned A's plaintext", asid)
		}
		if err := submit(dma.OpWrite, asid, bytes.Repeat([]byte{0xee}, 4096)); !errors.Is(err, ErrPermission) {
			t.Errorf("write to disk A under ASID %d: %v, want ErrPermission", asid, err)
		}
		if got := e.Stats.PermissionDenials.Load() - denied; got != 2 {
			t.Errorf("ASID %d: %d permission denials counted, want 2", asid, got)
		}
	}
	got := make([]byte, 4096)
	must(t, a.ReadAt(ctx, got, 0))
	if !bytes.Equal(got, secret) {
		t.Fatal("a refused write changed disk A")
	}

	// control: A's own ASID
	buf := make([]byte, 4096)
	if err := submit(dma.OpRead, 3, buf); err != nil || !bytes.Equal(buf, secret) {
		t.Fatalf("read of disk A under its own ASID: %v (data equal: %v)", err, bytes.Equal(buf, secret))
	}
}
