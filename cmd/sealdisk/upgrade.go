package main

import (
	"fmt"
	"log/slog"
	"os"
	"time"

	"github.com/spf13/cobra"

	"github.com/sealdisk/sealdisk/format"
	"github.com/sealdisk/sealdisk/image"
	"github.com/sealdisk/sealdisk/psp"
)

func upgradeCmd() *cobra.Command {
	var in, out, pspDir string
	cmd := &cobra.Command{
		Use:   "upgrade",
		Short: "Make a version-2 image (integrity tree, rollback counter) of a version-1 image",
		Long: `Writes a new version-2 image with the same image UUID, certificate and key as a version-1 image
(FORMAT.md §6.3): its journal is replayed in memory, every sector is authenticated, decrypted
and sealed afresh, the integrity tree is built and the first root record is authenticated by
this host's PSP. The input is not changed; the output appears only when complete. Version-1
images attach read-only; the upgraded one attaches read-write.`,
		Example: "  sealdisk upgrade --in vm-v1.img --out vm.img --psp /var/lib/sealdisk/psp",
		Args:    cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			if err := need(map[string]string{"in": in, "out": out, "psp": pspDir}); err != nil {
				return err
			}
			if _, err := os.Stat(out); err == nil {
				return fmt.Errorf("--out %s already exists; refusing to overwrite an image", out)
			}
			src, err := openImage(in, true)
			if err != nil {
				return err
			}
			defer src.Close()
			if err := src.Store.Lock(false); err != nil {
				return inUse("upgrade", in, err)
			}
			sh := src.Header
			if sh.Version != format.HeaderVersion1 {
				return fmt.Errorf("%s is already a version-%d image", in, sh.Version)
			}
			c, err := openCipher(src, pspDir, "")
			if err != nil {
				return err
			}
			defer c.Destroy()
			ov, js, err := image.Recover(src, c)
			if err != nil {
				return err
			}
			if js.Ignored != nil {
				slog.Warn("journal header invalid; journal ignored", "image", in, "error", js.Ignored)
			}
			p, err := psp.Open(pspDir, psp.Options{})
			if err != nil {
				return err
			}
			roots, err := p.RootsFor(src.Cert)
			if err != nil {
				return err
			}
			h, err := format.NewHeader(sh.UUID, sh.VirtualSize, sh.SectorSize, sh.Suite, sh.ReadOnly, format.Layout{}, sh.Cert)
			if err != nil {
				return err
			}
			sess, err := c.NewSession()
			if err != nil {
				return err
			}
			dst, err := image.CreatePending(out, h, cephConfig)
			if err != nil {
				return err
			}
			ctx, stop := signalContext()
			defer stop()
			prog, done := progress("upgrading")
			start := time.Now()
			err = image.Upgrade(ctx, src, c, ov, dst.Image, sess, roots.SealRoot, prog)
			done()
			if err := dst.Finish(err); err != nil {
				return fmt.Errorf("failed to upgrade %s: %w", in, err)
			}
			slog.Info("upgraded", "in", in, "out", out, "version", h.Version, "journal_records", js.Records, "seconds", time.Since(start).Seconds())
			return nil
		},
	}
	cmd.Flags().StringVar(&in, "in", "", "version-1 sealed image (a file or rbd:POOL/IMAGE)")
	cmd.Flags().StringVar(&out, "out", "", "version-2 image to write (a file or rbd:POOL/IMAGE)")
	cmd.Flags().StringVar(&pspDir, "psp", "", "PSP directory the image is sealed to")
	return cmd
}
