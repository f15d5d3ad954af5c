package main

import (
	"encoding/hex"
	"encoding/json"
	"fmt"
	"io"
	"log/slog"
	"time"

	"github.com/spf13/cobra"

	"github.com/sealdisk/sealdisk/format"
)

type scrubOut struct {
	Image        string      `json:"image"`
	Counter      uint64      `json:"counter"`
	Root         string      `json:"root"`
	Recovered    int         `json:"recovered_blocks"`
	CheckedBytes int64       `json:"checked_bytes"`
	Tree         string      `json:"tree"`
	Bad          []badSector `json:"bad_sectors"`
	Clean        bool        `json:"clean"`
	Seconds      float64     `json:"seconds"`
}

func scrubCmd() *cobra.Command {
	var pspDir, keyFile string
	var asJSON bool
	cmd := &cobra.Command{
		Use:   "scrub IMAGE",
		Short: "Verify every allocated sector and the integrity tree of an image",
		Long: `Reads a version-2 image as its VM would (the root record checked by the PSP, its counter, a
crashed image's committed journal recovered in memory), decrypts and authenticates every
allocated sector in parallel, and recomputes the integrity tree from the metadata region and
compares its root with the committed one. Every bad sector is reported (LBA and what failed)
instead of stopping at the first; the exit status is non-zero unless the image is clean. The
image is never changed.`,
		Example: "  sealdisk scrub vm.img --psp /var/lib/sealdisk/psp --json",
		Args:    cobra.ExactArgs(1),
		RunE: func(cmd *cobra.Command, args []string) error {
			if err := need(map[string]string{"psp": pspDir}); err != nil {
				return err
			}
			img, err := openImage(args[0], true)
			if err != nil {
				return err
			}
			defer img.Close()
			if err := img.Store.Lock(false); err != nil {
				return inUse("scrub", args[0], err)
			}
			if img.Header.Version < format.HeaderVersion2 {
				return fmt.Errorf("%s is a version-%d image, which has no integrity tree to scrub: `sealdisk unseal` checks every sector of it", args[0], img.Header.Version)
			}
			start := time.Now()
			o, err := openOffline(img, pspDir, keyFile)
			if err != nil {
				return fmt.Errorf("failed to scrub %s: %w", args[0], err)
			}
			org := o.Origin()
			rec := org.Record
			out := scrubOut{Image: args[0], Counter: rec.Counter, Root: hex.EncodeToString(rec.Root[:]), Recovered: org.Recovered, Bad: []badSector{}}
			ctx, stop := signalContext()
			defer stop()
			prog, done := progress("scrubbing")
			out.CheckedBytes, err = o.scrubSectors(ctx, prog, func(b badSector) {
				slog.Error("bad sector", "image", args[0], "lba", b.LBA, "error", b.Error)
				out.Bad = append(out.Bad, b)
			})
			done()
			if cerr := o.Close(); err == nil {
				err = cerr
			}
			if err != nil {
				return fmt.Errorf("failed to scrub %s: %w", args[0], err)
			}
			treeOK := true
			switch {
			case !img.Header.Tree:
				out.Tree = "none (the image has no integrity tree)"
			case org.Recovered > 0:
				// The region's pages are older than the record: recovery checked the tree
				// its replay made against the record's root.
				out.Tree = "checked by recovery (the journal held committed blocks)"
			default:
				got, err := img.TreeRoot()
				switch {
				case err != nil:
					out.Tree, treeOK = "unreadable: "+err.Error(), false
				case got != rec.Root:
					treeOK = false
					out.Tree = fmt.Sprintf("MISMATCH: the metadata region's tree root is %x, the committed root record says %x", got[:8], rec.Root[:8])
				default:
					out.Tree = "ok"
				}
			}
			out.Clean = len(out.Bad) == 0 && treeOK
			out.Seconds = time.Since(start).Seconds()
			if asJSON {
				e := json.NewEncoder(cmd.OutOrStdout())
				e.SetIndent("", "  ")
				if err := e.Encode(out); err != nil {
					return err
				}
			} else {
				printScrub(cmd.OutOrStdout(), &out)
			}
			if !out.Clean {
				return fmt.Errorf("%s is not clean: %d bad sectors, tree %s", args[0], len(out.Bad), out.Tree)
			}
			return nil
		},
	}
	cmd.Flags().StringVar(&pspDir, "psp", "", "PSP directory the image is sealed to")
	cmd.Flags().StringVar(&keyFile, "key-file", "", "an image whose key is in a key broker: its key (32 raw bytes, mode 0600)")
	cmd.Flags().BoolVar(&asJSON, "json", false, "print one JSON object")
	return cmd
}

func printScrub(w io.Writer, o *scrubOut) {
	p := func(k string, v any) { fmt.Fprintf(w, "%-18s %v\n", k+":", v) }
	p("image", o.Image)
	p("counter", o.Counter)
	p("root", o.Root)
	if o.Recovered > 0 {
		p("recovered", fmt.Sprintf("%d committed journal blocks (in memory)", o.Recovered))
	}
	p("checked", fmt.Sprintf("%d bytes in %.1f s", o.CheckedBytes, o.Seconds))
	p("tree", o.Tree)
	for _, b := range o.Bad {
		p(fmt.Sprintf("bad sector %d", b.LBA), b.Error)
	}
	p("clean", o.Clean)
}
