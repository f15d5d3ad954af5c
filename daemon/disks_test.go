package daemon

import (
	"bytes"
	"context"
	"errors"
	"net/http"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"testing"

	"github.com/sealdisk/sealdisk/config"
	"github.com/sealdisk/sealdisk/image"
	"github.com/sealdisk/sealdisk/internal/fixture"
	"github.com/sealdisk/sealdisk/psp"
	"github.com/sealdisk/sealdisk/store"
	"github.com/sealdisk/sealdisk/store/locate"
	"github.com/sealdisk/sealdisk/store/rbd"
)

// A VM with two disks and an NVRAM: each disk its own key slot under the VM's one ASID, each
// its own data; they detach together and free every slot and lock.
func TestVMWithSeveralDisks(t *testing.T) {
	e := newTestEnv(t)
	a, b, vars := e.image(t, e.w, "a.img"), e.image(t, e.w, "b.img"), e.image(t, e.w, "vars.img")
	e.writeConfig(t)
	d := e.start(t)
	vm := config.VMConfig{Name: "vm1", Firmware: e.fw, Disks: []config.DiskConfig{{Image: a}, {Image: b, Export: "data"}}, NVRAM: vars}
	if err := d.Attach(vm); err != nil {
		t.Fatal(err)
	}
	st := d.Status().VMs
	if len(st) != 1 || len(st[0].Disks) != 3 {
		t.Fatalf("status: %+v", st)
	}
	asid := psp.ASID(st[0].ASID)
	for i, ds := range st[0].Disks {
		if want := uint32(psp.KeySlot(asid, i)); ds.KeySlot != want {
			t.Errorf("disk %d: key slot %d, want %d", i, ds.KeySlot, want)
		}
	}
	if got := []string{st[0].Disks[0].Export, st[0].Disks[1].Export, st[0].Disks[2].Export}; !slices.Equal(got, []string{"vm1", "data", ""}) || !st[0].Disks[2].NVRAM {
		t.Fatalf("exports %q (the NVRAM has none)", got)
	}
	if n := len(d.psp.Launches()); n != 3 {
		t.Fatalf("%d PSP launches, want 3 (one per disk)", n)
	}
	// Each disk is its own image under its own key: what one gets, the others do not.
	ctx := context.Background()
	v := d.vms["vm1"]
	for i, ad := range v.Disks {
		if err := ad.Dev.WriteAt(ctx, bytes.Repeat([]byte{byte('A' + i)}, 4096), 0, true); err != nil {
			t.Fatal(err)
		}
	}
	for i, ad := range v.Disks {
		got := make([]byte, 4096)
		if err := ad.Dev.ReadAt(ctx, got, 0); err != nil || got[0] != byte('A'+i) || got[4095] != byte('A'+i) {
			t.Fatalf("disk %d reads %q…: %v", i, got[:4], err)
		}
	}
	// No other VM puts a key under this VM's ASID.
	c := e.image(t, e.w, "c.img")
	st0, err := locate.Open(c, true, rbd.Config{})
	if err != nil {
		t.Fatal(err)
	}
	img, err := image.OpenStore(st0)
	if err != nil {
		t.Fatal(err)
	}
	defer img.Close()
	_, err = d.psp.Launch(psp.LaunchRequest{VM: "intruder", Cert: img.Cert, Header: img.Header, FirmwarePath: e.fw, ASID: asid, Disk: 3})
	if !errors.Is(err, psp.ErrNoKeyBound) || !strings.Contains(err.Error(), "not bound to that VM's first disk") {
		t.Fatalf("another VM's disk under vm1's ASID: %v", err)
	}
	// The VM's ASID cannot be freed under its other disks' slots.
	if err := d.psp.Detach(asid); err == nil || !strings.Contains(err.Error(), "still has a key slot under it") {
		t.Fatalf("PSP detach of the VM's ASID under its disks: %v", err)
	}
	if err := d.Detach(ctx, "vm1"); err != nil {
		t.Fatal(err)
	}
	if n := len(d.psp.Launches()); n != 0 || len(d.images) != 0 {
		t.Fatalf("after detach: %d launches, images %v", n, d.images)
	}
	for _, img := range []string{a, b, vars} {
		f, err := store.OpenLocked(img, false)
		if err != nil {
			t.Fatalf("detach did not release %s: %v", img, err)
		}
		f.Close()
	}
}

// Disk 2 of a VM fails to attach (its image is another VM's, or signed by a provider this PSP does not trust): disk 1 is
// detached again, the error names the disk, and nothing is left — no launch, no lock, no export.
func TestVMDiskFailureDetachesTheOthers(t *testing.T) {
	e := newTestEnv(t)
	held, x := e.image(t, e.w, "held.img"), e.image(t, e.w, "x.img")
	other := e.image(t, fixture.New(t), "otherchip.img")
	e.writeConfig(t)
	d := e.start(t)
	if err := d.Attach(e.vm("owner", held, false)); err != nil {
		t.Fatal(err)
	}
	for _, c := range []struct {
		second string
		want   error
		status int
	}{{held, store.ErrLocked, http.StatusConflict}, {other, psp.ErrUnknownProvider, http.StatusUnprocessableEntity}} {
		vm := config.VMConfig{Name: "vm2", Firmware: e.fw, Disks: []config.DiskConfig{{Image: x}, {Image: c.second}}}
		err := d.Attach(vm)
		if !errors.Is(err, c.want) || httpStatus(err) != c.status || !strings.Contains(err.Error(), `failed to attach VM "vm2": disk 1 (`+c.second+`)`) {
			t.Fatalf("second disk %s: %v (status %d); want %v naming disk 1", c.second, err, httpStatus(err), c.want)
		}
		if got := attached(d); !slices.Equal(got, []string{"owner"}) || len(d.psp.Launches()) != 1 {
			t.Fatalf("after the refusal: attached %v, %d launches", got, len(d.psp.Launches()))
		}
		if _, ok := d.Status().NotServing["vm2"]; !ok {
			t.Fatal("status does not say why vm2 is not attached")
		}
		f, err := store.OpenLocked(x, false)
		if err != nil {
			t.Fatalf("disk 0 of the refused VM is still locked: %v", err)
		}
		f.Close()
	}
	// disk 0's export went with it: another VM can take the name
	if err := d.Attach(e.vm("vm2", x, false)); err != nil {
		t.Fatal(err)
	}
}

// Two disks of one VM on one file (here through a hard link) are refused before anything is
// opened, naming the key; across VMs the export and FUSE names of every disk are checked.
func TestVMDisksConflicts(t *testing.T) {
	e := newTestEnv(t)
	a, b := e.image(t, e.w, "a.img"), e.image(t, e.w, "b.img")
	link := filepath.Join(e.dir, "a-link.img")
	if err := os.Link(a, link); err != nil {
		t.Fatal(err)
	}
	e.writeConfig(t)
	d := e.start(t)
	vm := config.VMConfig{Name: "vm1", Firmware: e.fw, Disks: []config.DiskConfig{{Image: a}, {Image: link, ReadOnly: true}}}
	err := d.Attach(vm)
	var ke *config.KeyError
	if !errors.As(err, &ke) || ke.Key != "disks[1].image" || httpStatus(err) != http.StatusBadRequest {
		t.Fatalf("two disks on one file: %v", err)
	}
	if err := d.Attach(config.VMConfig{Name: "vm1", Firmware: e.fw, Disks: []config.DiskConfig{{Image: a}, {Image: b, Export: "shared"}}}); err != nil {
		t.Fatal(err)
	}
	c := e.image(t, e.w, "c.img")
	err = d.Attach(config.VMConfig{Name: "vm2", Firmware: e.fw, Disks: []config.DiskConfig{{Image: c, Export: "shared"}}})
	if !errors.Is(err, ErrConflict) || !strings.Contains(err.Error(), `export "shared" is VM "vm1"'s`) {
		t.Fatalf("export of another VM's second disk: %v", err)
	}
}

// Reload: a multi-disk VM whose disks[] changed is detached and attached again as a whole.
func TestReloadVMWithDisks(t *testing.T) {
	e := newTestEnv(t)
	a, b := e.image(t, e.w, "a.img"), e.image(t, e.w, "b.img")
	cfg := func(ro bool) {
		ros := "false"
		if ro {
			ros = "true"
		}
		writeFile(t, e.cfgPath, "psp:\n  dir: "+e.w.ChipDir+"\nengine:\n  cache_size: 4M\nnbd:\n  listen: [\"unix:"+filepath.Join(e.dir, "nbd.sock")+"\"]\n"+
			"vms:\n  - name: vm1\n    firmware: "+e.fw+"\n    disks:\n      - image: "+a+"\n      - image: "+b+"\n        read_only: "+ros+"\n")
	}
	cfg(false)
	d := e.start(t)
	if st := d.Status().VMs; len(st) != 1 || len(st[0].Disks) != 2 || st[0].Disks[1].ReadOnly {
		t.Fatalf("at start: %+v", st)
	}
	cfg(true)
	res, err := d.Reload(context.Background())
	if err != nil || !slices.Equal(res.Detached, []string{"vm1"}) || !slices.Equal(res.Attached, []string{"vm1"}) {
		t.Fatalf("reload: %+v %v", res, err)
	}
	if st := d.Status().VMs; len(st) != 1 || !st[0].Disks[1].ReadOnly || st[0].Disks[0].ReadOnly {
		t.Fatalf("after reload: %+v", st)
	}
}
