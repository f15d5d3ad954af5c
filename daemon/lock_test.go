package daemon

import (
	"context"
	"errors"
	"net/http"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"testing"

	"github.com/sealdisk/sealdisk/store"
	"github.com/sealdisk/sealdisk/store/storetest"
)

// refusedNaming checks an attach refusal: store.ErrLocked (409 on the admin API) naming the
// VM that holds the image and how.
func refusedNaming(t *testing.T, err error, holder, how string) {
	t.Helper()
	if err == nil {
		t.Fatalf("second attach succeeded; want a refusal naming VM %q", holder)
	}
	if !errors.Is(err, store.ErrLocked) || httpStatus(err) != http.StatusConflict ||
		!strings.Contains(err.Error(), `VM "`+holder+`" has it attached `+how) {
		t.Fatalf("second attach: %v (status %d); want ErrLocked naming VM %q (%s)", err, httpStatus(err), holder, how)
	}
}

// One owner per image: a VM attached read-write holds its image file against every other
// attach — by any path, read-write or read-only, in this daemon (the refusal names the VM) or
// from another process; detaching releases it.
func TestOneWriterPerImage(t *testing.T) {
	e := newTestEnv(t)
	img := e.image(t, e.w, "vm.img")
	link := filepath.Join(e.dir, "hardlink.img")
	if err := os.Link(img, link); err != nil {
		t.Fatal(err)
	}
	sym := filepath.Join(e.dir, "symlink.img")
	if err := os.Symlink(img, sym); err != nil {
		t.Fatal(err)
	}
	e.writeConfig(t)
	d := e.start(t)

	if err := d.Attach(e.vm("vm1", img, false)); err != nil {
		t.Fatal(err)
	}
	refusedNaming(t, d.Attach(e.vm("vm2", link, false)), "vm1", "read-write as "+img)
	refusedNaming(t, d.Attach(e.vm("vm3", sym, true)), "vm1", "read-write as "+img)
	refusedNaming(t, d.Attach(e.vm("vm4", img, false)), "vm1", "read-write")
	if got := attached(d); !slices.Equal(got, []string{"vm1"}) {
		t.Fatalf("attached %v", got)
	}

	// The file lock is there for everyone else: another open in this process, another
	// process, reading or writing.
	if f, err := store.OpenLocked(img, true); !errors.Is(err, store.ErrLocked) {
		f.Close()
		t.Fatalf("read lock beside the attached VM: %v", err)
	}
	for _, mode := range []string{"rw", "ro"} {
		p := storetest.StartLockProcess(t, mode == "ro", link)
		if code := p.Stop(); code != 3 || !strings.Contains(p.Line, "holds it read-write") {
			t.Fatalf("%s lock from another process: exit %d, %q", mode, code, p.Line)
		}
	}

	if err := d.Detach(context.Background(), "vm1"); err != nil {
		t.Fatal(err)
	}
	f, err := store.OpenLocked(img, false)
	if err != nil {
		t.Fatalf("detach did not release the image: %v", err)
	}
	f.Close()
	if err := d.Attach(e.vm("vm2", link, false)); err != nil {
		t.Fatalf("attach after detach: %v", err)
	}
	if err := d.Detach(context.Background(), "vm2"); err != nil {
		t.Fatal(err)
	}

	// Another process holds the image read-write: the daemon is refused by the lock (it
	// cannot name a VM there), and attaches once that process is gone.
	p := storetest.StartLockProcess(t, false, img)
	if p.Line != "locked" {
		t.Fatalf("lock process: %q", p.Line)
	}
	err = d.Attach(e.vm("vm1", sym, false))
	if !errors.Is(err, store.ErrLocked) || httpStatus(err) != http.StatusConflict || !strings.Contains(err.Error(), "holds it read-write") {
		t.Fatalf("attach of an image another process writes: %v", err)
	}
	if len(d.Status().VMs) != 0 || len(d.images) != 0 {
		t.Fatalf("a refused attach left state: %v, %v", attached(d), d.images)
	}
	p.Stop()
	if err := d.Attach(e.vm("vm1", sym, false)); err != nil {
		t.Fatalf("attach after the other process exited: %v", err)
	}
}

// Read-only attaches share an image with each other and with other readers, never with a
// writer; the image is free again only when the last reader detaches.
func TestReadersShareAnImage(t *testing.T) {
	e := newTestEnv(t)
	img := e.image(t, e.w, "vm.img")
	e.writeConfig(t)
	d := e.start(t)
	for _, name := range []string{"ro1", "ro2"} {
		if err := d.Attach(e.vm(name, img, true)); err != nil {
			t.Fatalf("read-only attach %s: %v", name, err)
		}
	}
	err := d.Attach(e.vm("rw", img, false))
	if err == nil || !strings.Contains(err.Error(), "has it attached read-only") {
		t.Fatalf("writer beside readers: %v", err)
	}
	refusedNaming(t, err, "ro1", "read-only")
	if p := storetest.StartLockProcess(t, true, img); p.Line != "locked" {
		t.Fatalf("reader in another process: %q", p.Line)
	} else {
		p.Stop()
	}
	if p := storetest.StartLockProcess(t, false, img); p.Stop() != 3 || !strings.Contains(p.Line, "holds it read-only") {
		t.Fatalf("writer in another process: %q", p.Line)
	}
	if err := d.Detach(context.Background(), "ro1"); err != nil {
		t.Fatal(err)
	}
	refusedNaming(t, d.Attach(e.vm("rw", img, false)), "ro2", "read-only")
	if err := d.Detach(context.Background(), "ro2"); err != nil {
		t.Fatal(err)
	}
	if err := d.Attach(e.vm("rw", img, false)); err != nil {
		t.Fatalf("writer after the readers left: %v", err)
	}
}

// Two VMs of the config file on one image: the first listed attaches, the second is not
// attached and status says which VM holds its image.
func TestConfigWithTwoVMsOnOneImage(t *testing.T) {
	e := newTestEnv(t)
	img := e.image(t, e.w, "vm.img")
	e.writeConfig(t, e.vm("vm1", img, false), e.vm("vm2", img, false))
	d := e.start(t)
	if got := attached(d); !slices.Equal(got, []string{"vm1"}) {
		t.Fatalf("attached %v", got)
	}
	if why := d.Status().NotServing["vm2"]; !strings.Contains(why, store.ErrLocked.Error()) || !strings.Contains(why, `VM "vm1" has it attached read-write`) {
		t.Fatalf("vm2 not serving because %q", why)
	}
}
