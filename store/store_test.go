package store_test

import (
	"path/filepath"
	"testing"

	"github.com/sealdisk/sealdisk/store"
	"github.com/sealdisk/sealdisk/store/storetest"
)

func TestFileAgainstModel(t *testing.T) {
	f, err := store.CreateFile(filepath.Join(t.TempDir(), "img"))
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	storetest.Exercise(t, f, 1)
}

// The model test again with the mapping on: Truncate remaps, writes past the end extend the
// file, reads straddling the mapping's end fall back to pread.
func TestMappedFileAgainstModel(t *testing.T) {
	f, err := store.CreateFile(filepath.Join(t.TempDir(), "img"))
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	if err := f.SetMapped(true); err != nil {
		t.Fatal(err)
	}
	storetest.Exercise(t, f, 3)
}
