package image

import (
	"errors"
	"os"
	"path/filepath"
	"testing"

	"github.com/google/uuid"

	"github.com/sealdisk/sealdisk/format"
	"github.com/sealdisk/sealdisk/store/rbd"
)

// TestPendingAppearsOnlyWhenComplete: a pending image or raw file is under OUT.tmp until
// Finish(nil) renames it; Finish(err) removes it and leaves an existing OUT alone; a leftover
// OUT.tmp is replaced.
func TestPendingAppearsOnlyWhenComplete(t *testing.T) {
	w := newWorld(t)
	id := uuid.New()
	cert := w.issue(t, w.ChipDir, id, 1<<20, 4096, format.SuiteAES256GCM, make([]byte, 32))
	h, err := format.NewHeader(id, 1<<20, 4096, format.SuiteAES256GCM, false, format.Layout{}, cert.Bytes())
	must(t, err)
	out := filepath.Join(t.TempDir(), "vm.img")
	exists := func(p string) bool { _, err := os.Stat(p); return err == nil }

	must(t, os.WriteFile(out+".tmp", []byte("leftover of a crashed run"), 0o600))
	p, err := CreatePending(out, h, rbd.Config{})
	must(t, err)
	if exists(out) {
		t.Fatal("OUT exists before Finish")
	}
	boom := errors.New("boom")
	if err := p.Finish(boom); err != boom || exists(out+".tmp") || exists(out) {
		t.Fatalf("Finish(err) = %v; tmp left %v, out made %v", err, exists(out+".tmp"), exists(out))
	}
	p, err = CreatePending(out, h, rbd.Config{})
	must(t, err)
	must(t, p.Finish(nil))
	if exists(out+".tmp") || !exists(out) {
		t.Fatal("Finish(nil) did not rename OUT.tmp to OUT")
	}
	img, err := Open(out, true)
	must(t, err)
	if img.Header.UUID != h.UUID {
		t.Fatal("renamed image has another header")
	}
	img.Close()

	raw := filepath.Join(t.TempDir(), "vm.raw")
	must(t, os.WriteFile(raw, []byte("the previous output"), 0o600))
	r, err := CreatePendingRaw(raw)
	must(t, err)
	r.Write([]byte("half"))
	if err := r.Finish(boom); err != boom || exists(raw+".tmp") {
		t.Fatalf("raw Finish(err) = %v, tmp left %v", err, exists(raw+".tmp"))
	}
	if b, _ := os.ReadFile(raw); string(b) != "the previous output" {
		t.Fatalf("a failed output changed the existing one: %q", b)
	}
	r, err = CreatePendingRaw(raw)
	must(t, err)
	r.Write([]byte("new"))
	must(t, r.Finish(nil))
	if b, _ := os.ReadFile(raw); string(b) != "new" {
		t.Fatalf("raw output reads %q", b)
	}
	if fi, _ := os.Stat(raw); fi.Mode().Perm() != 0o600 {
		t.Fatalf("raw output mode %v, want 0600 (it holds plaintext)", fi.Mode().Perm())
	}
}
