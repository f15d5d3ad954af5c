// Package enginetest attaches real sealed images (internal/fixture's world) to engines, for
// tests outside package engine: the conformance runs and the frontends.
package enginetest

import (
	"path/filepath"
	"testing"

	"github.com/sealdisk/sealdisk/engine"
	"github.com/sealdisk/sealdisk/internal/fixture"
	"github.com/sealdisk/sealdisk/store"
	"github.com/sealdisk/sealdisk/store/storetest"
)

// Disk returns a new attached disk of size bytes on a file in t.TempDir (or a crashable
// in-memory store when mem is set), on its own engine closed at cleanup. The image belongs to
// the process's shared fixture world: a package using it calls fixture.Main from TestMain.
func Disk(t testing.TB, size uint64, ss uint32, mem bool, opts engine.Options) *engine.Disk {
	t.Helper()
	im := fixture.Shared(t).Image(t, fixture.Spec{Size: size, SectorSize: ss})
	var st store.Store
	if mem {
		st = storetest.NewCrash()
	} else {
		f, err := store.CreateFile(filepath.Join(t.TempDir(), "vm.img"))
		if err != nil {
			t.Fatal(err)
		}
		st = f
	}
	im.Create(t, st)
	e := engine.New(opts)
	t.Cleanup(func() { e.Close() })
	if err := e.LoadKey(1, im.Binding()); err != nil {
		t.Fatal(err)
	}
	d, err := e.Attach(1, st, false)
	if err != nil {
		t.Fatal(err)
	}
	return d
}
