//go:build rbd

package rbd_test

import (
	"fmt"
	"testing"

	"github.com/sealdisk/sealdisk/engine"
	"github.com/sealdisk/sealdisk/engine/conformance"
	"github.com/sealdisk/sealdisk/internal/fixture"
)

// disk is a sealed image created in a fresh RBD image and attached to an engine of its own,
// as enginetest.Disk does on a file.
func disk(t *testing.T, size uint64, ss uint32, opts engine.Options) *engine.Disk {
	t.Helper()
	_, _, s := newImage(t)
	if err := s.Lock(true); err != nil {
		t.Fatal(err)
	}
	im := fixture.Shared(t).Image(t, fixture.Spec{Size: size, SectorSize: ss})
	im.Create(t, s)
	e := engine.New(opts)
	t.Cleanup(func() { e.Close() })
	if err := e.LoadKey(1, im.Binding()); err != nil {
		t.Fatal(err)
	}
	d, err := e.Attach(1, s, false)
	if err != nil {
		t.Fatal(err)
	}
	return d
}

// TestConformance runs the block-device suite through the engine on RBD, both sector sizes.
func TestConformance(t *testing.T) {
	for _, ss := range []uint32{4096, 512} {
		t.Run(fmt.Sprintf("ss%d", ss), func(t *testing.T) {
			conformance.Run(t, int64(ss), func(t *testing.T) engine.BlockDevice {
				return disk(t, conformance.Size, ss, engine.Options{Shards: 2, CacheBytes: 1 << 20})
			})
		})
	}
}
