package main

import (
	"bufio"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"os"
	"time"

	"github.com/google/uuid"
	"github.com/spf13/cobra"
	"golang.org/x/term"

	"github.com/sealdisk/sealdisk/format"
	"github.com/sealdisk/sealdisk/image"
	"github.com/sealdisk/sealdisk/psp"
	"github.com/sealdisk/sealdisk/statefile"
)

func stateCmd() *cobra.Command {
	cmd := &cobra.Command{
		Use:   "state",
		Short: "Seal and restore a VM's saved state (QEMU save and migration streams)",
		Long: `A VM's saved state holds its memory in the clear. 'state seal' turns the stream QEMU writes on
a save or migration into a file sealed to a chip like an image (a fresh key in a certificate
the provider signs, bound to the firmware the VM may be restored under); 'state unseal' gives
the stream back to the QEMU restoring it, after the PSP checked the certificate and the
firmware, authenticating every chunk before it passes it on (docs/FORMAT.md §11).`,
		Example: `  (qemu) migrate "exec:sealdisk state seal --out vm.state --chip psp/chip.crt --vendor-root vendor/vendor.crt --provider-key provider/provider.key --firmware OVMF_CODE.fd"
  qemu-system-x86_64 ... -incoming "exec:sealdisk state unseal --in vm.state --psp /var/lib/sealdisk/psp --firmware OVMF_CODE.fd"`,
	}
	cmd.AddCommand(stateSealCmd(), stateUnsealCmd())
	return cmd
}

func stateSealCmd() *cobra.Command {
	var f certFlags
	var in, out string
	cmd := &cobra.Command{
		Use:   "seal",
		Short: "Seal a VM state stream (stdin, or --in) into a state file",
		Long: `Reads a VM state stream to its end — from stdin by default, as QEMU's migrate "exec:…" gives it —
and writes it sealed to --chip: a fresh key in a certificate signed by --provider-key that
allows the --firmware (or --measurement) the VM may be restored under. The file is written as
OUT.tmp and renamed when the stream has ended, so a save that fails leaves no state file.`,
		Example: `  (qemu) migrate "exec:sealdisk state seal --out vm.state --chip psp/chip.crt --vendor-root vendor/vendor.crt --provider-key provider/provider.key --firmware OVMF_CODE.fd"
  sealdisk state seal --in saved.raw --out vm.state --chip host2-chip.crt --vendor-root vendor/vendor.crt --provider-key provider/provider.key --firmware OVMF_CODE.fd`,
		Args: cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			if err := need(map[string]string{"out": out}); err != nil {
				return err
			}
			if ok, err := fileExists(out); err != nil || ok {
				if err != nil {
					return fmt.Errorf("--out %s: %w", out, err)
				}
				return fmt.Errorf("--out %s already exists; refusing to overwrite a state file", out)
			}
			src := io.Reader(os.Stdin)
			if in != "" && in != "-" {
				fi, err := os.Open(in)
				if err != nil {
					return fmt.Errorf("--in: %w", err)
				}
				defer fi.Close()
				src = fi
			}
			// A state key is certified as a read-only image of one chunk (FORMAT.md §11.1).
			f.sectorSize, f.readOnly = statefile.SectorSize, true
			id := uuid.New()
			cert, key, err := f.issue(id, statefile.ChunkSize)
			if err != nil {
				return err
			}
			defer clear(key)
			dst, err := image.CreatePendingRaw(out)
			if err != nil {
				return err
			}
			start := time.Now()
			w := bufio.NewWriterSize(dst, 1<<20)
			n, err := statefile.Seal(w, bufio.NewReaderSize(src, 1<<20), cert.Suite, id, cert.Bytes(), key)
			if err == nil {
				err = w.Flush()
			}
			if err := dst.Finish(err); err != nil {
				return fmt.Errorf("failed to seal the state into %s: %w", out, err)
			}
			slog.Info("state sealed", "out", out, "bytes", n, "uuid", id.String(), "seconds", time.Since(start).Seconds())
			return nil
		},
	}
	cmd.Flags().StringVar(&in, "in", "-", "state stream to seal; - is stdin")
	cmd.Flags().StringVar(&out, "out", "", "state file to write")
	f.registerCert(cmd)
	return cmd
}

func stateUnsealCmd() *cobra.Command {
	var in, out, pspDir, firmware string
	cmd := &cobra.Command{
		Use:   "unseal",
		Short: "Give a state file's stream back (stdout, or --out) for a restore",
		Long: `Checks the state file's certificate with the PSP (signed by a trusted provider, for this chip,
in its validity) and the firmware the restored VM runs against the measurements it allows,
then writes the state stream to stdout — for QEMU's -incoming "exec:…" — or to --out. Each
chunk is authenticated before its bytes are written; a changed, reordered or missing chunk, or
a file cut short, stops the stream with an error and a non-zero exit, so QEMU's restore fails.`,
		Example: `  qemu-system-x86_64 ... -incoming "exec:sealdisk state unseal --in vm.state --psp /var/lib/sealdisk/psp --firmware OVMF_CODE.fd"
  sealdisk state unseal --in vm.state --psp psp --firmware OVMF_CODE.fd --out saved.raw`,
		Args: cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			if err := need(map[string]string{"in": in, "psp": pspDir, "firmware": firmware}); err != nil {
				return err
			}
			var dst io.Writer = os.Stdout
			var pending *image.PendingRaw
			if out != "" && out != "-" {
				var err error
				if pending, err = image.CreatePendingRaw(out); err != nil {
					return err
				}
				dst = pending
			} else if term.IsTerminal(int(os.Stdout.Fd())) {
				return errors.New("refusing to write a VM's memory to a terminal: redirect stdout, or use --out")
			}
			n, err := unsealState(in, pspDir, firmware, dst)
			if pending != nil {
				err = pending.Finish(err)
			}
			if err != nil {
				return fmt.Errorf("failed to unseal the state in %s: %w", in, err)
			}
			slog.Info("state unsealed", "in", in, "bytes", n)
			return nil
		},
	}
	cmd.Flags().StringVar(&in, "in", "", "state file")
	cmd.Flags().StringVar(&out, "out", "-", "where to write the stream; - is stdout")
	cmd.Flags().StringVar(&pspDir, "psp", "", "PSP directory of the chip the state is sealed to")
	cmd.Flags().StringVar(&firmware, "firmware", "", "firmware the restored VM runs (measured; the certificate must allow it)")
	return cmd
}

func unsealState(in, pspDir, firmware string, dst io.Writer) (int64, error) {
	f, err := os.Open(in)
	if err != nil {
		return 0, err
	}
	defer f.Close()
	r := bufio.NewReaderSize(f, 1<<20)
	h, err := statefile.ReadHeader(r)
	if err != nil {
		return 0, err
	}
	c, err := format.ParseCertificate(h.Cert)
	if err != nil {
		return 0, err
	}
	if err := h.CheckCertificate(c); err != nil {
		return 0, err
	}
	p, err := psp.Open(pspDir, psp.Options{})
	if err != nil {
		return 0, err
	}
	key, err := p.UnsealStateKey(c, firmware)
	if err != nil {
		return 0, err
	}
	defer clear(key)
	w := bufio.NewWriterSize(dst, 1<<20)
	n, err := statefile.Open(w, r, h, key)
	if ferr := w.Flush(); err == nil {
		err = ferr
	}
	return n, err
}

func fileExists(p string) (bool, error) {
	_, err := os.Stat(p)
	if errors.Is(err, os.ErrNotExist) {
		return false, nil
	}
	return err == nil, err
}
