package config

import (
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/spf13/pflag"
)

func write(t *testing.T, s string) string {
	p := filepath.Join(t.TempDir(), "sealdisk.yaml")
	if err := os.WriteFile(p, []byte(s), 0o644); err != nil {
		t.Fatal(err)
	}
	return p
}

func TestPrecedence(t *testing.T) {
	dir := t.TempDir()
	p := write(t, "log:\n  level: warn\npsp:\n  asids: 10\n  dir: "+dir+"\n")
	c, err := Load(p, nil)
	if err != nil || c.Log.Level != "warn" || c.PSP.ASIDs != 10 || c.PSP.Dir != dir {
		t.Fatalf("%+v %v", c, err)
	}
	t.Setenv("SEALDISK_PSP_ASIDS", "20")
	if c, err = Load(p, nil); err != nil || c.PSP.ASIDs != 20 {
		t.Fatalf("env: %+v %v", c, err)
	}
	fs := pflag.NewFlagSet("x", pflag.ContinueOnError)
	fs.Int("psp-asids", 0, "")
	if err := fs.Parse([]string{"--psp-asids=30"}); err != nil {
		t.Fatal(err)
	}
	if c, err = Load(p, fs); err != nil || c.PSP.ASIDs != 30 {
		t.Fatalf("flag: %+v %v", c, err)
	}
	// A key with an underscore is a flag with a dash there.
	fs = pflag.NewFlagSet("x", pflag.ContinueOnError)
	fs.Bool("fuse-allow-other", false, "")
	fs.String("engine-cache-size", "", "")
	if err := fs.Parse([]string{"--fuse-allow-other", "--engine-cache-size=8M"}); err != nil {
		t.Fatal(err)
	}
	if c, err = Load(p, fs); err != nil || !c.FUSE.AllowOther || c.Engine.CacheSize != "8M" {
		t.Fatalf("flags for keys with underscores: %+v %v", c, err)
	}
	// engine.placed_run: 64K unless set; 0 is off.
	if n, err := c.Engine.PlacedBytes(); err != nil || n != 64<<10 {
		t.Fatalf("placed_run by default: %d %v", n, err)
	}
	fs = pflag.NewFlagSet("x", pflag.ContinueOnError)
	fs.String("engine-placed-run", "", "")
	if err := fs.Parse([]string{"--engine-placed-run=0"}); err != nil {
		t.Fatal(err)
	}
	if c, err = Load(p, fs); err != nil {
		t.Fatal(err)
	}
	if n, err := c.Engine.PlacedBytes(); err != nil || n != 0 {
		t.Fatalf("placed_run 0: %d %v", n, err)
	}
}

func TestRefusalsNameTheKey(t *testing.T) {
	for yaml, key := range map[string]string{
		"log:\n  levle: info\n":    "levle",
		"bogus: 1\n":               "bogus",
		"log:\n  level: loud\n":    "log.level",
		"psp:\n  asids: 0\n":       "psp.asids",
		"psp:\n  dir: /nonexist\n": "psp.dir",
		"psp:\n  asids: many\n":    "asids",
	} {
		_, err := Load(write(t, yaml), nil)
		if err == nil || !strings.Contains(err.Error(), key) {
			t.Errorf("%q: %v", yaml, err)
		}
	}
	var ke *KeyError
	if _, err := Load(write(t, "log:\n  format: xml\n"), nil); !errors.As(err, &ke) || ke.Key != "log.format" {
		t.Errorf("format: %v", err)
	}
	if _, err := Load("/nonexistent.yaml", nil); err == nil {
		t.Error("missing file accepted")
	}
}

func TestServeConfig(t *testing.T) {
	dir := t.TempDir()
	img, fw := filepath.Join(dir, "vm.img"), filepath.Join(dir, "OVMF.fd")
	os.WriteFile(img, []byte("x"), 0o600)
	os.WriteFile(fw, []byte("x"), 0o600)
	good := "nbd:\n  listen: [\"unix:" + dir + "/nbd.sock\"]\nvms:\n  - name: vm1\n    image: " + img + "\n    firmware: " + fw + "\n"
	c, err := Load(write(t, good), nil)
	if err != nil || len(c.VMs) != 1 || c.VMs[0].ExportName() != "vm1" || c.Engine.CacheSize != "256M" {
		t.Fatalf("%+v %v", c, err)
	}
	vm := "  - name: %s\n    image: " + img + "\n    firmware: " + fw + "\n    asid: %d\n"
	for yaml, key := range map[string]string{
		"vms:\n" + fmt.Sprintf(vm, "a", 1) + fmt.Sprintf(vm, "a", 2):                             "vms[1].name",
		"vms:\n" + fmt.Sprintf(vm, "a", 3) + fmt.Sprintf(vm, "b", 3):                             "vms[1].asid",
		"vms:\n  - name: x\n    image: /nonexistent\n    firmware: " + fw + "\n":                 "vms[0].image",
		"vms:\n  - name: x\n    image: " + img + "\n":                                            "vms[0].firmware",
		"vms:\n  - name: x\n    image: " + img + "\n    firmware: " + fw + "\n    colour: red\n": "colour",
		"nbd:\n  listen: [\"tcp:0.0.0.0:10809\"]\n":                                              "nbd.listen[0]",
		"nbd:\n  listen: [\"tcp:nohost\"]\n  insecure_tcp: true\n":                               "nbd.listen[0]",
		"nbd:\n  listen: [\"udp:x\"]\n":                                                          "nbd.listen[0]",
		"engine:\n  cache_size: lots\n":                                                          "engine.cache_size",
		"engine:\n  idle_flush: -1s\n":                                                           "engine.idle_flush",
		"engine:\n  shards: -1\n":                                                                "engine.shards",
		"engine:\n  placed_run: 1k\n":                                                            "engine.placed_run",
		"engine:\n  placed_run: big\n":                                                           "engine.placed_run",
		"nbd:\n  tls_cert: /nonexistent\n  tls_key: /nonexistent\n":                              "nbd.tls_cert",
		"vms:\n  - name: x\n    image: rbd:pool\n    firmware: " + fw + "\n":                     "vms[0].image",
		"ceph:\n  conf: /nonexistent\n":                                                          "ceph.conf",
		"ceph:\n  keyring: /nonexistent\n":                                                       "ceph.keyring",
		"ceph:\n  id: client.sealdisk\n":                                                         "ceph.id",
		"ceph:\n  key: AQBsecret==\n":                                                            "key",
	} {
		_, err := Load(write(t, yaml), nil)
		if err == nil || !strings.Contains(err.Error(), key) {
			t.Errorf("%q: want an error naming %s, got %v", yaml, key, err)
		} else if strings.Contains(err.Error(), "AQBsecret") {
			t.Errorf("%q: the error repeats a secret: %v", yaml, err)
		}
	}
	if _, err := Load(write(t, "nbd:\n  listen: [\"tcp:127.0.0.1:0\"]\n  insecure_tcp: true\n"), nil); err != nil {
		t.Fatal(err)
	}
	// an RBD image is checked for form at load, and asked of the cluster only at attach
	rbdVM := "ceph:\n  conf: " + img + "\n  id: sealdisk\n  keyring: " + img + "\nvms:\n  - name: x\n    image: rbd:pool/vm1\n    firmware: " + fw + "\n"
	if c, err := Load(write(t, rbdVM), nil); err != nil || c.Ceph.RBD().ID != "sealdisk" || c.VMs[0].Image != "rbd:pool/vm1" {
		t.Fatalf("%+v %v", c, err)
	}
}

func TestParseSize(t *testing.T) {
	for in, want := range map[string]uint64{"512": 512, "4K": 4096, "256M": 256 << 20, "20G": 20 << 30, "1TiB": 1 << 40, "2GB": 2 << 30} {
		if got, err := ParseSize(in); err != nil || got != want {
			t.Errorf("%s: %d %v", in, got, err)
		}
	}
	for _, in := range []string{"", "0", "x", "-1G", "1Q"} {
		if _, err := ParseSize(in); err == nil {
			t.Errorf("%q accepted", in)
		}
	}
}

// engine.mmap is on unless the file, SEALDISK_ENGINE_MMAP or --engine-mmap turns it off.
func TestEngineMmap(t *testing.T) {
	if c, err := Load("", nil); err != nil || !c.Engine.Mmap {
		t.Fatalf("default: %+v %v", c, err)
	}
	if c, err := Load(write(t, "engine:\n  mmap: false\n"), nil); err != nil || c.Engine.Mmap {
		t.Fatalf("file: %+v %v", c, err)
	}
	t.Setenv("SEALDISK_ENGINE_MMAP", "false")
	if c, err := Load("", nil); err != nil || c.Engine.Mmap {
		t.Fatalf("env: %+v %v", c, err)
	}
	t.Setenv("SEALDISK_ENGINE_MMAP", "true")
	fs := pflag.NewFlagSet("x", pflag.ContinueOnError)
	fs.Bool("engine-mmap", true, "")
	if err := fs.Parse([]string{"--engine-mmap=false"}); err != nil {
		t.Fatal(err)
	}
	if c, err := Load("", fs); err != nil || c.Engine.Mmap {
		t.Fatalf("flag: %+v %v", c, err)
	}
}
