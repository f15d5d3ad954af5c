package config

import (
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"testing"
)

// vms[].disks[] and nvram: defaults, and every refusal naming its key.
func TestVMDisks(t *testing.T) {
	dir := t.TempDir()
	file := func(name string) string {
		p := filepath.Join(dir, name)
		if err := os.WriteFile(p, []byte("x"), 0o600); err != nil {
			t.Fatal(err)
		}
		return p
	}
	a, b, vars, fw := file("a.img"), file("b.img"), file("vars.img"), file("OVMF_CODE.fd")
	link := filepath.Join(dir, "link.img")
	if err := os.Symlink(b, link); err != nil {
		t.Fatal(err)
	}
	head := "vms:\n  - name: vm1\n    firmware: " + fw + "\n"
	good := head + "    disks:\n      - image: " + a + "\n      - image: " + b + "\n        read_only: true\n        export: data\n" +
		"    nvram: " + vars + "\n"
	c, err := Load(write(t, good), nil)
	if err != nil {
		t.Fatal(err)
	}
	got := c.VMs[0].AllDisks()
	want := []DiskConfig{
		{Image: a, Export: "vm1", File: "vm1.raw"},
		{Image: b, Export: "data", ReadOnly: true, File: "data.raw"},
		{Image: vars, File: "vm1.nvram", NVRAM: true},
	}
	if !slices.Equal(got, want) {
		t.Fatalf("disks:\n got %+v\nwant %+v", got, want)
	}
	// the one-image form is one disk, as before
	c, err = Load(write(t, head+"    image: "+a+"\n    export: e1\n    read_only: true\n"), nil)
	if err != nil {
		t.Fatal(err)
	}
	if got := c.VMs[0].AllDisks(); !slices.Equal(got, []DiskConfig{{Image: a, Export: "e1", ReadOnly: true, File: "e1.raw"}}) {
		t.Fatalf("image: %+v", got)
	}
	// a second disk without an export is NAME-1
	c, err = Load(write(t, head+"    disks:\n      - image: "+a+"\n      - image: "+b+"\n        file: second.img\n"), nil)
	if err != nil {
		t.Fatal(err)
	}
	if d := c.VMs[0].AllDisks()[1]; d.Export != "vm1-1" || d.File != "second.img" {
		t.Fatalf("second disk: %+v", d)
	}

	vm2 := "  - name: vm2\n    firmware: " + fw + "\n"
	for yaml, key := range map[string]string{
		head + "    disks:\n      - image: " + a + "\n      - export: x\n":                                                    "vms[0].disks[1].image",
		head + "    disks:\n      - image: " + a + "\n      - image: /nonexistent\n":                                          "vms[0].disks[1].image",
		head + "    disks:\n      - image: " + a + "\n      - image: " + a + "\n":                                             "vms[0].disks[1].image",
		head + "    disks:\n      - image: " + b + "\n      - image: " + link + "\n":                                          "vms[0].disks[1].image",
		head + "    disks:\n      - image: " + a + "\n        export: x\n      - image: " + b + "\n        export: x\n":       "vms[0].disks[1].export",
		head + "    disks:\n      - image: " + a + "\n        file: f\n      - image: " + b + "\n        file: f\n":           "vms[0].disks[1].file",
		head + "    disks:\n      - image: " + a + "\n        file: a/b\n":                                                    "vms[0].disks[0].file",
		head + "    image: " + a + "\n    disks:\n      - image: " + b + "\n":                                                 "vms[0].image",
		head + "    read_only: true\n    disks:\n      - image: " + b + "\n":                                                  "vms[0].read_only",
		head + "    disks:\n      - image: " + a + "\n      - imgae: " + b + "\n":                                             "imgae",
		head + "    image: " + a + "\n    nvram: /nonexistent\n":                                                              "vms[0].nvram",
		head + "    image: " + a + "\n    nvram: " + a + "\n":                                                                 "vms[0].nvram",
		head + "    image: " + a + "\n    nvram: " + vars + "\n    nvram_file: vm1.raw\n":                                     "vms[0].nvram_file",
		head + "    disks:\n      - image: " + a + "\n" + vm2 + "    disks:\n      - image: " + b + "\n        export: vm1\n": "vms[1].disks[0].export",
		head + "    image: " + a + "\n" + vm2 + "    disks:\n      - image: " + b + "\n        file: vm1.raw\n":               "vms[1].disks[0].file",
		head + "    image: " + a + "\n" + vm2 + "    image: " + b + "\n    nvram: " + vars + "\n    nvram_file: vm1.raw\n":    "vms[1].nvram_file",
		head + "    disks:\n" + strings.Repeat("      - image: "+a+"\n", MaxDisks+1):                                          "vms[0].disks",
	} {
		_, err := Load(write(t, yaml), nil)
		if err == nil || !strings.Contains(err.Error(), key) {
			t.Errorf("%s: want an error naming %s, got %v", yaml, key, err)
		}
		var ke *KeyError
		if err != nil && !errors.As(err, &ke) && key != "imgae" {
			t.Errorf("%s: not a KeyError: %v", yaml, err)
		}
	}
	var many strings.Builder
	for i := range MaxDisks + 1 {
		many.WriteString("      - image: " + file(fmt.Sprintf("d%d.img", i)) + "\n")
	}
	if _, err := Load(write(t, head+"    disks:\n"+many.String()), nil); err == nil || !strings.Contains(err.Error(), "vms[0].disks: 17 disks") {
		t.Errorf("17 disks: %v", err)
	}
	// Check (the admin API's attach) refuses a VM's two disks on one file by itself too.
	vm := VMConfig{Name: "x", Firmware: fw, Disks: []DiskConfig{{Image: b}, {Image: link, ReadOnly: true}}}
	if err := vm.Check(509); err == nil || !strings.Contains(err.Error(), "disks[1].image") || !strings.Contains(err.Error(), "the same file") {
		t.Fatalf("Check: %v", err)
	}
}
