package engine

import (
	"bytes"
	"errors"
	"math/rand"
	"sync"
	"testing"

	"github.com/sealdisk/sealdisk/dma"
)

// TestMemoryEncryptionStage: with the simulated memory controller on, the coprocessor only
// ever sees DMA payloads encrypted under the VM's VEK, the disk still behaves as a disk, the
// image bytes are those of the ordinary data path, and a descriptor whose ASID has no VEK is
// refused.
func TestMemoryEncryptionStage(t *testing.T) {
	const size = 4 << 20
	marker := []byte("PLAINTEXT-MARKER")
	im := newTestImage(t, size, 4096, 0)
	st, path := fileStore(t, im)
	e := New(Options{Shards: 2, CacheBytes: 128 << 10, StripeSectors: 64, MemoryEncryption: true})
	var mu sync.Mutex // guards seen, leaked
	seen, leaked := 0, 0
	e.observe = func(desc *dma.Descriptor) {
		if desc.Op != dma.OpWrite {
			return
		}
		mu.Lock()
		seen++
		if bytes.Contains(desc.Buf, marker[:8]) {
			leaked++
		}
		mu.Unlock()
	}
	d := im.attach(t, e, 3, st)
	if !e.mem.Loaded(3) {
		t.Fatal("LoadKey did not give the VM a VEK")
	}
	model := NewMemDevice(size, false)
	r := rand.New(rand.NewSource(1))
	for i := 0; i < 400; i++ {
		off := r.Int63n(size)
		n := min(1+r.Int63n(200<<10), size-off)
		switch k := r.Intn(6); {
		case k < 3:
			buf := bytes.Repeat(marker, int(n)/len(marker)+1)[:n]
			must(t, d.WriteAt(ctx, buf, off, k == 0))
			must(t, model.WriteAt(ctx, buf, off, false))
		case k < 5:
			a, b := make([]byte, n), make([]byte, n)
			must(t, d.ReadAt(ctx, a, off))
			must(t, model.ReadAt(ctx, b, off))
			if !bytes.Equal(a, b) {
				t.Fatalf("op %d: read [%d,+%d) differs", i, off, n)
			}
		default:
			must(t, d.Trim(ctx, off, n, false))
			must(t, model.Trim(ctx, off, n, false))
		}
	}
	mu.Lock()
	if seen == 0 || leaked != 0 {
		t.Fatalf("%d of %d write payloads reached the coprocessor in plaintext", leaked, seen)
	}
	mu.Unlock()

	// without its VEK, the VM's descriptors are refused (never processed in the clear)
	e.mem.Clear(3)
	if err := d.WriteAt(ctx, []byte{1}, 0, false); !errors.Is(err, ErrPermission) {
		t.Fatalf("write without a VEK: %v", err)
	}
	if err := d.ReadAt(ctx, make([]byte, 10), 0); !errors.Is(err, ErrPermission) {
		t.Fatalf("read without a VEK: %v", err)
	}
	must(t, e.mem.Load(3))
	must(t, e.ClearKey(3))
	if e.mem.Loaded(3) {
		t.Fatal("ClearKey left the VEK loaded")
	}
	must(t, e.Close())

	// the image is an ordinary image: an engine without the stage reads the same disk
	e2 := New(Options{Shards: 3})
	defer e2.Close()
	d2 := im.attach(t, e2, 1, reopen(t, path))
	a, b := make([]byte, size), make([]byte, size)
	must(t, d2.ReadAt(ctx, a, 0))
	must(t, model.ReadAt(ctx, b, 0))
	if !bytes.Equal(a, b) {
		t.Fatal("image written with memory encryption reads differently without it")
	}
}
