package main

import (
	"bytes"
	"context"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"net/url"
	"os"
	"path/filepath"
	"strings"
	"text/tabwriter"
	"time"

	"github.com/spf13/cobra"

	"github.com/sealdisk/sealdisk/config"
	"github.com/sealdisk/sealdisk/daemon"
)

// adminCmd is the client of the admin API a running `sealdisk serve` offers on admin.socket.
func adminCmd() *cobra.Command {
	cmd := &cobra.Command{
		Use:   "admin",
		Short: "Talk to a running 'sealdisk serve' through its admin socket",
		Long: `Status, attach, detach, attest and reload for a running server. The socket is the
server's admin.socket (--socket, or SEALDISK_ADMIN_SOCKET).`,
		Example: `  sealdisk admin --socket /run/sealdisk/admin.sock status
  sealdisk admin --socket /run/sealdisk/admin.sock attach --name vm2 --image vm2.img --firmware OVMF.fd
  sealdisk admin --socket /run/sealdisk/admin.sock detach vm2
  sealdisk admin --socket /run/sealdisk/admin.sock attest vm1 --nonce-file nonce.bin --out report.json
  sealdisk admin --socket /run/sealdisk/admin.sock reload`,
	}
	cmd.PersistentFlags().String("socket", os.Getenv("SEALDISK_ADMIN_SOCKET"), "the server's admin socket (admin.socket)")
	cmd.AddCommand(adminStatusCmd(), adminAttachCmd(), adminDetachCmd(), adminAttestCmd(), adminReloadCmd(), adminMetricsCmd())
	return cmd
}

type adminClient struct {
	socket string
	hc     *http.Client
}

func newAdminClient(cmd *cobra.Command) (*adminClient, error) {
	sock, _ := cmd.Flags().GetString("socket")
	if sock == "" {
		return nil, errors.New("no admin socket: give --socket (the server's admin.socket) or set SEALDISK_ADMIN_SOCKET")
	}
	if fi, err := os.Stat(sock); err != nil {
		return nil, fmt.Errorf("admin socket %s: %w (is 'sealdisk serve' running with admin.socket set?)", sock, err)
	} else if fi.Mode()&os.ModeSocket == 0 {
		return nil, fmt.Errorf("admin socket %s is not a socket", sock)
	}
	tr := &http.Transport{DialContext: func(ctx context.Context, _, _ string) (net.Conn, error) {
		var d net.Dialer
		return d.DialContext(ctx, "unix", sock)
	}}
	return &adminClient{socket: sock, hc: &http.Client{Transport: tr, Timeout: 2 * time.Minute}}, nil
}

// call sends a request and decodes a 2xx JSON answer into out (if not nil); other answers
// become an error carrying the server's message.
func (c *adminClient) call(method, path string, body, out any) ([]byte, error) {
	var rd io.Reader
	if body != nil {
		b, err := json.Marshal(body)
		if err != nil {
			return nil, err
		}
		rd = bytes.NewReader(b)
	}
	req, err := http.NewRequest(method, "http://sealdisk"+path, rd)
	if err != nil {
		return nil, err
	}
	resp, err := c.hc.Do(req)
	if err != nil {
		return nil, fmt.Errorf("failed to reach the server on %s: %w", c.socket, err)
	}
	defer resp.Body.Close()
	raw, err := io.ReadAll(io.LimitReader(resp.Body, 64<<20))
	if err != nil {
		return nil, fmt.Errorf("failed to read the server's answer: %w", err)
	}
	if resp.StatusCode/100 != 2 {
		var e struct{ Error string }
		if json.Unmarshal(raw, &e) == nil && e.Error != "" {
			return nil, fmt.Errorf("server: %s (%s)", e.Error, resp.Status)
		}
		return nil, fmt.Errorf("server: %s: %s", resp.Status, strings.TrimSpace(string(raw)))
	}
	if out != nil && len(raw) > 0 {
		if err := json.Unmarshal(raw, out); err != nil {
			return nil, fmt.Errorf("failed to decode the server's answer: %w", err)
		}
	}
	return raw, nil
}

func adminStatusCmd() *cobra.Command {
	cmd := &cobra.Command{
		Use: "status", Example: "  sealdisk admin --socket /run/sealdisk/admin.sock status --json", Short: "Show the attached VMs", Args: cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			c, err := newAdminClient(cmd)
			if err != nil {
				return err
			}
			var st daemon.Status
			raw, err := c.call("GET", "/v1/status", nil, &st)
			if err != nil {
				return err
			}
			w := cmd.OutOrStdout()
			if j, _ := cmd.Flags().GetBool("json"); j {
				_, err := w.Write(raw)
				return err
			}
			fmt.Fprintf(w, "sealdisk %s, up since %s, chip %s, %d engine shards\n", st.Version, st.Started.Format(time.RFC3339), st.PSP[:16], st.Shards)
			if len(st.NBD) > 0 {
				fmt.Fprintf(w, "NBD: %s\n", strings.Join(st.NBD, ", "))
			}
			if st.FUSE != "" {
				fmt.Fprintf(w, "FUSE: %s\n", st.FUSE)
			}
			tw := tabwriter.NewWriter(w, 0, 4, 2, ' ', 0)
			fmt.Fprintln(tw, "VM\tASID\tSIZE\tMODE\tREADS\tEXPORT\tSOURCE\tIMAGE")
			for _, v := range st.VMs {
				mode := "rw"
				if v.ReadOnly {
					mode = "ro"
				}
				reads := "pread"
				if v.MappedBytes > 0 {
					reads = "mapped"
				}
				fmt.Fprintf(tw, "%s\t%d\t%d\t%s\t%s\t%s\t%s\t%s\n", v.Name, v.ASID, v.Size, mode, reads, v.Export, v.Source, v.Image)
			}
			tw.Flush()
			for name, why := range st.NotServing {
				fmt.Fprintf(w, "not attached: %s: %s\n", name, why)
			}
			return nil
		},
	}
	cmd.Flags().Bool("json", false, "print the server's JSON")
	return cmd
}

func adminAttachCmd() *cobra.Command {
	cmd := &cobra.Command{
		Use: "attach", Example: "  sealdisk admin --socket /run/sealdisk/admin.sock attach --name vm2 --image vm2.img --firmware OVMF.fd", Short: "Attach a VM's sealed image (the PSP checks run as at start)", Args: cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			c, err := newAdminClient(cmd)
			if err != nil {
				return err
			}
			f := cmd.Flags()
			var r daemon.VMRequest
			r.Name, _ = f.GetString("name")
			r.Image, _ = f.GetString("image")
			r.Firmware, _ = f.GetString("firmware")
			r.ASID, _ = f.GetInt("asid")
			r.ReadOnly, _ = f.GetBool("read-only")
			r.Export, _ = f.GetString("export")
			r.Identity, _ = f.GetString("identity")
			r.NVRAM, _ = f.GetString("nvram")
			r.NVRAMFile, _ = f.GetString("nvram-file")
			specs, _ := f.GetStringArray("disk")
			for _, spec := range specs {
				dc, err := parseDiskSpec(spec)
				if err != nil {
					return err
				}
				r.Disks = append(r.Disks, dc)
			}
			// The server opens the files: send absolute paths so they mean what the caller meant.
			paths := []*string{&r.Image, &r.Firmware, &r.NVRAM}
			for i := range r.Disks {
				paths = append(paths, &r.Disks[i].Image)
			}
			for _, p := range paths {
				if *p != "" {
					if *p, err = filepath.Abs(*p); err != nil {
						return err
					}
				}
			}
			if first := r.Image; r.Name == "" && (first != "" || len(r.Disks) > 0) {
				if first == "" {
					first = r.Disks[0].Image
				}
				r.Name = strings.TrimSuffix(filepath.Base(first), ".img")
			}
			var v daemon.VMStatus
			if _, err := c.call("POST", "/v1/vms", r, &v); err != nil {
				return err
			}
			fmt.Fprintf(cmd.OutOrStdout(), "attached %s: ASID %d, %d bytes", v.Name, v.ASID, v.Size)
			if v.Export != "" {
				fmt.Fprintf(cmd.OutOrStdout(), ", NBD export %q", v.Export)
			}
			if v.File != "" {
				fmt.Fprintf(cmd.OutOrStdout(), ", file %s", v.File)
			}
			for _, ds := range v.Disks[1:] {
				fmt.Fprintf(cmd.OutOrStdout(), "; disk %d: %d bytes", ds.Index, ds.Size)
				if ds.Export != "" {
					fmt.Fprintf(cmd.OutOrStdout(), ", NBD export %q", ds.Export)
				}
				if ds.File != "" {
					fmt.Fprintf(cmd.OutOrStdout(), ", file %s", ds.File)
				}
			}
			fmt.Fprintln(cmd.OutOrStdout())
			return nil
		},
	}
	f := cmd.Flags()
	f.String("name", "", "VM name (default: the image file name without .img)")
	f.String("image", "", "sealed image")
	f.String("firmware", "", "the VM's firmware file")
	f.Int("asid", 0, "ASID, 0 = allocate")
	f.Bool("read-only", false, "attach read-only")
	f.String("export", "", "NBD export name (default: the VM name)")
	f.String("identity", "", "TLS client identity allowed to open the export")
	f.StringArray("disk", nil, "a disk, instead of --image; repeat for several, in order: IMAGE[,export=NAME][,file=NAME][,read_only]")
	f.String("nvram", "", "sealed UEFI variable store, served as the FUSE file NAME.nvram")
	f.String("nvram-file", "", "FUSE file name of the NVRAM (default NAME.nvram)")
	return cmd
}

// parseDiskSpec reads --disk IMAGE[,export=NAME][,file=NAME][,read_only].
func parseDiskSpec(spec string) (config.DiskConfig, error) {
	parts := strings.Split(spec, ",")
	dc := config.DiskConfig{Image: parts[0]}
	for _, p := range parts[1:] {
		k, v, _ := strings.Cut(p, "=")
		switch k {
		case "export":
			dc.Export = v
		case "file":
			dc.File = v
		case "read_only", "ro":
			dc.ReadOnly = true
		default:
			return dc, fmt.Errorf("--disk %q: unknown setting %q (export=NAME, file=NAME, read_only)", spec, p)
		}
	}
	if dc.Image == "" {
		return dc, fmt.Errorf("--disk %q: the image comes first", spec)
	}
	return dc, nil
}

func adminDetachCmd() *cobra.Command {
	return &cobra.Command{
		Use: "detach NAME", Example: "  sealdisk admin --socket /run/sealdisk/admin.sock detach vm2", Short: "Detach a VM: write back, zeroise its cache and key slot", Args: cobra.ExactArgs(1),
		RunE: func(cmd *cobra.Command, args []string) error {
			c, err := newAdminClient(cmd)
			if err != nil {
				return err
			}
			if _, err := c.call("DELETE", "/v1/vms/"+url.PathEscape(args[0]), nil, nil); err != nil {
				return err
			}
			fmt.Fprintf(cmd.OutOrStdout(), "detached %s\n", args[0])
			return nil
		},
	}
}

func adminAttestCmd() *cobra.Command {
	cmd := &cobra.Command{
		Use: "attest NAME", Example: "  nonce=$(openssl rand -hex 32)\n  sealdisk admin --socket /run/sealdisk/admin.sock attest vm1 --nonce $nonce --out report.json\n  sealdisk attest verify report.json --vendor-root vendor/vendor.crt --nonce $nonce", Short: "Get a signed attestation report of a VM's launch for your nonce", Args: cobra.ExactArgs(1),
		Long: `Asks the PSP to sign a report of what it checked when it launched NAME (firmware
measurement, certificate, ASID), bound to a nonce you choose. Check it with
'sealdisk attest verify'.`,
		RunE: func(cmd *cobra.Command, args []string) error {
			c, err := newAdminClient(cmd)
			if err != nil {
				return err
			}
			f := cmd.Flags()
			nonceHex, _ := f.GetString("nonce")
			nonceFile, _ := f.GetString("nonce-file")
			if (nonceHex == "") == (nonceFile == "") {
				return errors.New("give exactly one of --nonce HEX and --nonce-file FILE")
			}
			if nonceFile != "" {
				b, err := os.ReadFile(nonceFile)
				if err != nil {
					return fmt.Errorf("failed to read --nonce-file: %w", err)
				}
				nonceHex = hex.EncodeToString(b)
			} else if _, err := hex.DecodeString(nonceHex); err != nil {
				return fmt.Errorf("--nonce: not hex: %w", err)
			}
			disk, _ := f.GetInt("disk")
			raw, err := c.call("POST", "/v1/vms/"+url.PathEscape(args[0])+"/attest", daemon.AttestRequest{Nonce: nonceHex, Disk: disk}, nil)
			if err != nil {
				return err
			}
			if out, _ := f.GetString("out"); out != "" {
				return os.WriteFile(out, raw, 0o644)
			}
			_, err = cmd.OutOrStdout().Write(raw)
			return err
		},
	}
	cmd.Flags().String("nonce", "", "nonce, hex")
	cmd.Flags().String("nonce-file", "", "nonce, raw bytes from a file")
	cmd.Flags().Int("disk", 0, "which of the VM's disks (disks[] order, nvram last; 0 is the first)")
	cmd.Flags().String("out", "", "write the report here instead of stdout")
	return cmd
}

func adminReloadCmd() *cobra.Command {
	return &cobra.Command{
		Use: "reload", Example: "  sealdisk admin --socket /run/sealdisk/admin.sock reload", Short: "Re-read the config file and the PSP's trust store (as SIGHUP does) and show what changed", Args: cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			c, err := newAdminClient(cmd)
			if err != nil {
				return err
			}
			var r daemon.ReloadResult
			if _, err := c.call("POST", "/v1/reload", nil, &r); err != nil {
				return err
			}
			w := cmd.OutOrStdout()
			fmt.Fprintf(w, "attached: %s\ndetached: %s\n", strings.Join(r.Attached, " "), strings.Join(r.Detached, " "))
			for name, why := range r.Failed {
				fmt.Fprintf(w, "failed: %s: %s\n", name, why)
			}
			if len(r.Restart) > 0 {
				fmt.Fprintf(w, "changed, takes effect at the next start: %s\n", strings.Join(r.Restart, " "))
			}
			if len(r.Untrusted) > 0 {
				fmt.Fprintf(w, "provider no longer trusted, still attached until detached: %s\n", strings.Join(r.Untrusted, " "))
			}
			if len(r.Failed) > 0 {
				return fmt.Errorf("%d VM(s) failed; see above", len(r.Failed))
			}
			return nil
		},
	}
}

func adminMetricsCmd() *cobra.Command {
	return &cobra.Command{
		Use: "metrics", Example: "  sealdisk admin --socket /run/sealdisk/admin.sock metrics | grep sealdisk_nbd", Short: "Print the server's Prometheus metrics", Args: cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			c, err := newAdminClient(cmd)
			if err != nil {
				return err
			}
			resp, err := c.hc.Get("http://sealdisk/metrics")
			if err != nil {
				return fmt.Errorf("failed to reach the server on %s: %w", c.socket, err)
			}
			defer resp.Body.Close()
			if resp.StatusCode != http.StatusOK {
				return fmt.Errorf("server: %s", resp.Status)
			}
			_, err = io.Copy(cmd.OutOrStdout(), resp.Body)
			return err
		},
	}
}
