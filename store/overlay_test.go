package store_test

import (
	"bytes"
	"crypto/sha256"
	"math/rand"
	"os"
	"path/filepath"
	"testing"

	"github.com/sealdisk/sealdisk/store"
	"github.com/sealdisk/sealdisk/store/storetest"
)

func TestOverlayModel(t *testing.T) {
	o, err := store.NewOverlay(storetest.NewMem(0))
	if err != nil {
		t.Fatal(err)
	}
	storetest.Exercise(t, o, 7)
}

// The base shows through where nothing was written, and is never changed: not by writes,
// punches or truncates of the overlay.
func TestOverlayLeavesBase(t *testing.T) {
	path := filepath.Join(t.TempDir(), "base")
	base := make([]byte, 3*4096+100)
	rand.New(rand.NewSource(1)).Read(base)
	if err := os.WriteFile(path, base, 0o600); err != nil {
		t.Fatal(err)
	}
	f, err := store.OpenFile(path, true)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	o, err := store.NewOverlay(f)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := o.WriteAt([]byte("overlay"), 4090); err != nil { // straddles a page boundary
		t.Fatal(err)
	}
	if err := o.Punch(8192, 10); err != nil {
		t.Fatal(err)
	}
	want := bytes.Clone(base)
	copy(want[4090:], "overlay")
	clear(want[8192:8202])
	got := make([]byte, len(base))
	if n, err := o.ReadAt(got, 0); err != nil || n != len(base) || !bytes.Equal(got, want) {
		t.Fatalf("read %d bytes, %v; equal %v", n, err, bytes.Equal(got, want))
	}
	if err := o.Truncate(12300); err != nil {
		t.Fatal(err)
	}
	if err := o.Truncate(int64(len(base))); err != nil {
		t.Fatal(err)
	}
	if _, err := o.ReadAt(got, 0); err != nil || !bytes.Equal(got[12300:], make([]byte, len(base)-12300)) {
		t.Fatalf("the base showed through a truncate: %v", err)
	}
	on, err := os.ReadFile(path)
	if err != nil || sha256.Sum256(on) != sha256.Sum256(base) {
		t.Fatalf("the base file changed: %v", err)
	}
}
