package main

import (
	"os"
	"path/filepath"
	"strings"
	"testing"
)

// TestAttachArguments: flag mistakes are refused before anything is opened.
func TestAttachArguments(t *testing.T) {
	dir := t.TempDir()
	key := filepath.Join(dir, "k.pem")
	os.WriteFile(key, []byte("x"), 0o644)
	for _, tc := range []struct {
		args []string
		want string
	}{
		{[]string{"attach", "--socket", "s", "/dev/nbd0"}, "--export"},
		{[]string{"attach", "--export", "vm", "/dev/nbd0"}, "exactly one of --socket"},
		{[]string{"attach", "--export", "vm", "--socket", "s", "--tcp", "h:1", "/dev/nbd0"}, "exactly one of --socket"},
		{[]string{"attach", "--export", "vm", "--tcp", "h:1", "/dev/nbd0"}, "--tcp needs TLS"},
		{[]string{"attach", "--export", "vm", "--tcp", "nohost", "--insecure-tcp", "/dev/nbd0"}, "--tcp \"nohost\""},
		{[]string{"attach", "--export", "vm", "--socket", "s", "--tls-cert", "c", "/dev/nbd0"}, "--tls-cert and --tls-key go together"},
		{[]string{"attach", "--export", "vm", "--socket", "s", "--tls-cert", "c", "--tls-key", key, "/dev/nbd0"}, "--tls-cert needs --tls-ca"},
		{[]string{"attach", "--export", "vm", "--socket", "s", "--tls-ca", filepath.Join(dir, "none"), "/dev/nbd0"}, "--tls-ca"},
		{[]string{"attach", "--export", "vm", "--socket", "s", "--tls-ca", key, "/dev/nbd0"}, "no PEM certificate"},
		{[]string{"attach", "--export", "vm", "--socket", "s"}, "accepts 1 arg"},
		{[]string{"attach", "--export", "vm", "--socket", filepath.Join(dir, "nothing.sock"), "/dev/nbd0"}, "failed to connect to the NBD server"},
	} {
		_, err := sealdisk(t, tc.args...)
		if err == nil || !strings.Contains(err.Error(), tc.want) {
			t.Errorf("%v: error %v, want it to mention %q", tc.args, err, tc.want)
		}
	}
}
