package daemon

import (
	"fmt"
	"net"
	"os"
	"strings"

	"github.com/sealdisk/sealdisk/config"
	"github.com/sealdisk/sealdisk/nbd"
)

// listenNBD opens one nbd.listen entry. A unix: socket gets nbd.socket_group and
// nbd.socket_mode before anything is served on it, so that another user's QEMU (libvirt's
// libvirt-qemu) can connect; a socket that cannot be given them fails the start.
func listenNBD(l string, c config.NBDConfig) (net.Listener, error) {
	kind, addr, _ := strings.Cut(l, ":")
	if kind != "unix" {
		return nbd.ListenTCP(addr, c.TLSCert != "", c.InsecureTCP)
	}
	// Owner only until the group is set: widening the mode first would let the old group in.
	ln, err := nbd.ListenUnix(addr, 0o600)
	if err != nil {
		return nil, err
	}
	if err := setSocketPerms(addr, c); err != nil {
		ln.Close()
		return nil, err
	}
	return ln, nil
}

// setSocketPerms gives the socket at path nbd.socket_group (if set), then nbd.socket_mode.
func setSocketPerms(path string, c config.NBDConfig) error {
	mode, err := c.SocketPerm()
	if err != nil {
		return err
	}
	gid, err := c.SocketGID()
	if err != nil {
		return err
	}
	if gid >= 0 {
		if err := os.Lchown(path, -1, gid); err != nil {
			return fmt.Errorf("failed to give NBD socket %s the group %q (nbd.socket_group, gid %d): %w", path, c.SocketGroup, gid, err)
		}
	}
	if err := os.Chmod(path, mode); err != nil {
		return fmt.Errorf("failed to set NBD socket %s to mode %#o (nbd.socket_mode): %w", path, mode, err)
	}
	return nil
}
