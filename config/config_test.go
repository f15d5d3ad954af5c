package config

import (
	"errors"
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
