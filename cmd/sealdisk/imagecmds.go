package main

import (
	"context"
	"crypto"
	"crypto/sha256"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"maps"
	"os"
	"os/signal"
	"sync"
	"syscall"
	"time"

	"github.com/google/uuid"
	"github.com/schollz/progressbar/v3"
	"github.com/spf13/cobra"
	"golang.org/x/term"

	"github.com/sealdisk/sealdisk/format"
	"github.com/sealdisk/sealdisk/image"
	"github.com/sealdisk/sealdisk/provider"
	"github.com/sealdisk/sealdisk/psp"
	"github.com/sealdisk/sealdisk/sector"
	"github.com/sealdisk/sealdisk/store/locate"
)

// progress returns a progress callback drawing a bar when stderr is a terminal.
func progress(what string) (image.Progress, func()) {
	if !term.IsTerminal(int(os.Stderr.Fd())) {
		return nil, func() {}
	}
	var mu sync.Mutex // guards bar and shown: the image workers report concurrently
	var bar *progressbar.ProgressBar
	var shown int64
	return func(done, total int64) {
			mu.Lock()
			defer mu.Unlock()
			if bar == nil {
				bar = progressbar.DefaultBytes(total, what)
			}
			if done > shown { // workers finish out of order: never move backwards
				shown = done
				_ = bar.Set64(done)
			}
		}, func() {
			mu.Lock()
			defer mu.Unlock()
			if bar != nil {
				_ = bar.Finish()
			}
		}
}

func signalContext() (context.Context, context.CancelFunc) {
	return signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
}

// newImage creates OUT.tmp with a fresh UUID and certificate, in the given layout (the zero
// Layout: the current version); finish writes the first root record and renames it into place.
func newImage(out string, f *certFlags, virtualSize uint64, l format.Layout) (*image.Image, *sector.Cipher, func(error) error, error) {
	if ok, err := locate.Exists(out, cephConfig); err != nil || ok {
		if err != nil {
			return nil, nil, nil, fmt.Errorf("--out %s: %w", out, err)
		}
		return nil, nil, nil, fmt.Errorf("--out %s already exists; refusing to overwrite an image", out)
	}
	id := uuid.New()
	cert, key, err := f.issue(id, virtualSize)
	if err != nil {
		return nil, nil, nil, err
	}
	defer clear(key)
	h, err := format.NewHeader(id, virtualSize, f.sectorSize, cert.Suite, f.readOnly, l, cert.Bytes())
	if err != nil {
		return nil, nil, nil, err
	}
	c, err := sector.NewCipher(cert.Suite, key, id, int(f.sectorSize))
	if err != nil {
		return nil, nil, nil, err
	}
	o, err := image.CreatePending(out, h, cephConfig)
	if err != nil {
		c.Destroy()
		return nil, nil, nil, err
	}
	return o.Image, c, func(err error) error {
		c.Destroy()
		if err == nil {
			err = o.WriteFirstRoot(f.signer) // the tree over what was written; syncs
		}
		return o.Finish(err)
	}, nil
}

func createCmd() *cobra.Command {
	var f certFlags
	var out, size string
	cmd := &cobra.Command{
		Use:   "create",
		Short: "Create a blank sealed image",
		Long: `Creates a sparse sealed image of the given virtual size: a fresh image key sealed to the chip in
a certificate signed by the provider. Every sector reads as zeros until written; the file
takes 128 KiB on disk.`,
		Example: `  sealdisk create --size 20G --out vm.img --chip psp/chip.crt --vendor-root vendor/vendor.crt \
      --provider-key provider/provider.key --firmware /usr/share/OVMF/OVMF_CODE.fd`,
		Args: cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			if err := need(map[string]string{"out": out, "size": size}); err != nil {
				return err
			}
			n, err := parseSize(size)
			if err != nil {
				return fmt.Errorf("--size: %w", err)
			}
			if n%uint64(f.sectorSize) != 0 {
				return fmt.Errorf("--size %d is not a multiple of the %d-byte sector size", n, f.sectorSize)
			}
			l, err := f.layout()
			if err != nil {
				return err
			}
			img, _, finish, err := newImage(out, &f, n, l)
			if err != nil {
				return err
			}
			id := img.Header.UUID
			if err := finish(nil); err != nil {
				return err
			}
			fmt.Fprintf(cmd.OutOrStdout(), "created %s: %d bytes, image uuid %s\n", out, n, uuid.UUID(id))
			return nil
		},
	}
	cmd.Flags().StringVar(&out, "out", "", "image to create: a file or rbd:POOL/IMAGE")
	cmd.Flags().StringVar(&size, "size", "", "virtual disk size, e.g. 20G")
	f.register(cmd)
	return cmd
}

func sealCmd() *cobra.Command {
	var f certFlags
	var in, out string
	cmd := &cobra.Command{
		Use:   "seal",
		Short: "Seal an existing raw disk image",
		Long: `Encrypts a raw disk image into a new sealed image. The virtual size is the input's size rounded
up to a whole sector (the tail reads as zeros). Holes and all-zero sectors of the input stay
holes. The output appears only when complete (written as OUT.tmp, then renamed).`,
		Example: `  sealdisk seal --in disk.raw --out vm.img --chip psp/chip.crt --vendor-root vendor/vendor.crt \
      --provider-key provider/provider.key --firmware OVMF.fd --suite aes-256-gcm`,
		Args: cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			if err := need(map[string]string{"in": in, "out": out}); err != nil {
				return err
			}
			src, err := os.Open(in)
			if err != nil {
				return fmt.Errorf("failed to open input: %w", err)
			}
			defer src.Close()
			fi, err := src.Stat()
			if err != nil {
				return err
			}
			if fi.Size() == 0 {
				return fmt.Errorf("--in %s is empty: nothing to seal", in)
			}
			vs := format.RoundUpVirtualSize(uint64(fi.Size()), f.sectorSize)
			l, err := f.layout()
			if err != nil {
				return err
			}
			img, c, finish, err := newImage(out, &f, vs, l)
			if err != nil {
				return err
			}
			sess, err := c.NewSession()
			if err != nil {
				return finish(err)
			}
			ctx, stop := signalContext()
			defer stop()
			prog, done := progress("sealing")
			start := time.Now()
			err = image.Seal(ctx, src, img, sess, prog)
			done()
			if err := finish(err); err != nil {
				return fmt.Errorf("failed to seal %s: %w", in, err)
			}
			slog.Info("sealed", "in", in, "out", out, "bytes", vs, "seconds", time.Since(start).Seconds())
			return nil
		},
	}
	cmd.Flags().StringVar(&in, "in", "", "raw disk image to seal")
	cmd.Flags().StringVar(&out, "out", "", "sealed image to create: a file or rbd:POOL/IMAGE")
	f.register(cmd)
	return cmd
}

func unsealCmd() *cobra.Command {
	var in, out, pspDir, keyFile string
	var force bool
	cmd := &cobra.Command{
		Use:   "unseal",
		Short: "Decrypt a sealed image back to a raw image",
		Long: `Decrypts a sealed image into a raw file of its virtual size, using the PSP the image is sealed
to (its trust store must hold the provider). Never-written sectors stay holes. Any sector that
fails authentication stops the unseal with an error naming the sector; the partial output is
removed.`,
		Example: "  sealdisk unseal --in vm.img --out disk.raw --psp /var/lib/sealdisk/psp",
		Args:    cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			if err := need(map[string]string{"in": in, "out": out, "psp": pspDir}); err != nil {
				return err
			}
			if _, err := os.Stat(out); err == nil && !force {
				return fmt.Errorf("--out %s exists; add --force to overwrite", out)
			}
			img, err := openImage(in, true)
			if err != nil {
				return err
			}
			defer img.Close()
			if err := img.Store.Lock(false); err != nil {
				return inUse("unseal", in, err)
			}
			if img.FellBack() {
				slog.Warn("primary header invalid; using backup", "image", in, "error", img.Status.PrimaryErr)
			}
			// run writes the plaintext: through the engine's read path for version 2 (root
			// record, counter, tree), by the version-1 journal replay otherwise.
			run := func(ctx context.Context, dst *os.File, prog image.Progress) error {
				return unsealV2(ctx, img, pspDir, keyFile, dst, prog)
			}
			if img.Header.Version < format.HeaderVersion2 {
				c, err := openCipher(img, pspDir, keyFile)
				if err != nil {
					return err
				}
				defer c.Destroy()
				ov, js, err := image.Recover(img, c)
				if err != nil {
					return err
				}
				if js.Ignored != nil {
					slog.Warn("journal header invalid; journal ignored", "image", in, "error", js.Ignored)
				}
				if js.Records > 0 {
					slog.Info("replayed journal in memory", "epoch", js.Epoch, "records", js.Records,
						"new_entries", js.UsedNew, "rolled_back", js.UsedOld, "trimmed", js.Trimmed, "unresolved", len(js.Unresolved))
				}
				if len(js.Unresolved) > 0 {
					slog.Warn("journaled sectors match neither entry (they will fail authentication)", "lbas", js.Unresolved)
				}
				run = func(ctx context.Context, dst *os.File, prog image.Progress) error {
					return image.Unseal(ctx, img, c, ov, dst, prog)
				}
			}
			dst, err := image.CreatePendingRaw(out)
			if err != nil {
				return err
			}
			ctx, stop := signalContext()
			defer stop()
			prog, done := progress("unsealing")
			start := time.Now()
			err = run(ctx, dst.File, prog)
			done()
			if err := dst.Finish(err); err != nil {
				return fmt.Errorf("failed to unseal %s: %w", in, err)
			}
			slog.Info("unsealed", "in", in, "out", out, "bytes", img.Header.VirtualSize, "seconds", time.Since(start).Seconds())
			return nil
		},
	}
	cmd.Flags().StringVar(&in, "in", "", "sealed image: a file or rbd:POOL/IMAGE")
	cmd.Flags().StringVar(&out, "out", "", "raw image to write")
	cmd.Flags().StringVar(&pspDir, "psp", "", "PSP directory the image is sealed to")
	cmd.Flags().BoolVar(&force, "force", false, "overwrite --out")
	cmd.Flags().StringVar(&keyFile, "key-file", "", "an image whose key is in a key broker: its key (32 raw bytes, mode 0600)")
	return cmd
}

// openCipher verifies the certificate with the PSP and returns the image's sector cipher.
// offlineOpen opens the PSP in pspDir and img's key with it (or from keyFile, for a key kept
// in a broker); the caller clears the key.
func offlineOpen(img *image.Image, pspDir, keyFile string) (*psp.PSP, []byte, error) {
	p, err := psp.Open(pspDir, psp.Options{})
	if err != nil {
		return nil, nil, err
	}
	key, err := offlineKey(p, img, keyFile)
	if err != nil {
		return nil, nil, err
	}
	return p, key, nil
}

// openCipher is img's sector cipher for the version-1 offline tools.
func openCipher(img *image.Image, pspDir, keyFile string) (*sector.Cipher, error) {
	_, key, err := offlineOpen(img, pspDir, keyFile)
	if err != nil {
		return nil, err
	}
	defer clear(key)
	return sector.NewCipher(img.Cert.Suite, key, img.Cert.UUID, int(img.Cert.SectorSize))
}

func resealCmd() *cobra.Command {
	var in, pspDir, toChip, root, providerKey, keyFile string
	cmd := &cobra.Command{
		Use:   "reseal",
		Short: "Re-seal an image's certificate to another chip (host migration)",
		Long: `Opens the image key with the current PSP, seals it to another chip and has the provider sign the
new certificate; every other certificate field is kept. Only the two header copies are
rewritten (backup first, then primary); the data, metadata and journal are untouched.
An image whose key lives in a broker keeps its broker URL and key id (allow the new chip in
the broker's policy); a version-2 one needs --key-file to carry its root record.`,
		Example: `  sealdisk reseal --in vm.img --psp /var/lib/sealdisk/psp --to-chip host2-chip.crt \
      --vendor-root vendor/vendor.crt --provider-key provider/provider.key`,
		Args: cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			if err := need(map[string]string{"in": in, "psp": pspDir, "to-chip": toChip, "vendor-root": root, "provider-key": providerKey}); err != nil {
				return err
			}
			chip, err := loadChip(toChip, root)
			if err != nil {
				return err
			}
			// One open, locked exclusive, reads the key, writes the carried root record and
			// rewrites the headers: on RBD a second client could not write beside the lock.
			img, err := openImage(in, false)
			if err != nil {
				return err
			}
			defer img.Close()
			if err := img.Store.Lock(true); err != nil {
				return inUse("reseal", in, err)
			}
			cert, gen, err := resealCert(img, pspDir, chip, providerKey, keyFile)
			if err != nil {
				return err
			}
			if err := img.Rewrite(cert); err != nil {
				return fmt.Errorf("failed to reseal %s: %w", in, err)
			}
			if err := img.Store.Sync(); err != nil {
				return fmt.Errorf("failed to reseal %s: %w", in, err)
			}
			fmt.Fprintf(cmd.OutOrStdout(), "resealed %s to chip %x (header generation %d)\n", in, chip.ID, gen)
			return nil
		},
	}
	cmd.Flags().StringVar(&in, "in", "", "sealed image, a file or rbd:POOL/IMAGE (rewritten in place)")
	cmd.Flags().StringVar(&pspDir, "psp", "", "PSP directory the image is sealed to now")
	cmd.Flags().StringVar(&toChip, "to-chip", "", "chip certificate of the new host")
	cmd.Flags().StringVar(&root, "vendor-root", "", "vendor root the new chip certificate must chain to")
	cmd.Flags().StringVar(&providerKey, "provider-key", "", "provider private key that signs the new certificate")
	cmd.Flags().StringVar(&keyFile, "key-file", "", "remote-key version-2 image: its key (32 raw bytes, mode 0600)")
	return cmd
}

// resealCert opens the image key of img with the PSP in pspDir and issues a certificate sealing
// it to chip, every other field kept. It returns the certificate and the header generation
// the rewrite will carry.
func resealCert(img *image.Image, pspDir string, chip *psp.ChipCert, providerKey, keyFile string) ([]byte, uint64, error) {
	if img.FellBack() {
		slog.Warn("primary header invalid; using backup (reseal rewrites both)", "image", img.Store.Name(), "error", img.Status.PrimaryErr)
	}
	p, err := psp.Open(pspDir, psp.Options{})
	if err != nil {
		return nil, 0, err
	}
	old := img.Cert
	req := provider.IssueRequest{
		Chip: chip, UUID: old.UUID, VirtualSize: old.VirtualSize, SectorSize: old.SectorSize,
		Suite: old.Suite, MeasureAlg: old.MeasureAlg, Measurements: old.Measurements,
		NotBefore: old.NotBefore, NotAfter: old.NotAfter, ReadOnly: old.ReadOnly,
	}
	var key []byte
	if old.Remote {
		// The key stays in the broker; only a version-2 image's root record needs it here.
		if _, err := p.VerifyCertificate(old, img.Header); err != nil {
			return nil, 0, err
		}
		req.BrokerURL, req.KeyID = old.BrokerURL, old.KeyID
		if keyFile != "" {
			if key, err = readImageKeyFile(keyFile); err != nil {
				return nil, 0, err
			}
		} else if img.Header.Version >= format.HeaderVersion2 {
			return nil, 0, fmt.Errorf("reseal of %s: its key is in broker %s (key %s) and a version-2 image's root record needs it: pass --key-file", img.Store.Name(), old.BrokerURL, old.KeyID)
		}
	} else {
		if key, err = p.UnsealImageKey(old, img.Header); err != nil {
			return nil, 0, err
		}
		req.ImageKey = key
	}
	defer clear(key)
	signer, err := provider.LoadSigner(providerKey)
	if err != nil {
		return nil, 0, err
	}
	nc, err := provider.Issue(signer, req)
	if err != nil {
		return nil, 0, err
	}
	if key != nil {
		if err := carryRoot(img, p, key, signer); err != nil {
			return nil, 0, err
		}
	}
	return nc.Bytes(), img.Header.Generation + 1, nil
}

// carryRoot writes a version-2 image's committed root record again, signed by the provider
// instead of MACed by this chip's PSP, into the slot not holding it (FORMAT.md §8
// "Migration"): the new chip cannot check the old chip's MAC, and the record carries the
// image's counter, root and journal state to it. It refuses an image behind this PSP's
// counter. Written before the headers, so a crash in between leaves an image the old chip
// still opens (it accepts its provider's records too).
func carryRoot(img *image.Image, p *psp.PSP, key []byte, signer crypto.Signer) error {
	h := img.Header
	if h.Version < format.HeaderVersion2 {
		return nil
	}
	roots, err := p.RootsFor(img.Cert)
	if err != nil {
		return err
	}
	c, err := sector.NewCipher(h.Suite, key, h.UUID, int(h.SectorSize))
	if err != nil {
		return err
	}
	defer c.Destroy()
	com, err := c.CurrentRoot(img.Store, h, roots.CheckRoot)
	if err != nil {
		return fmt.Errorf("failed to reseal: %w", err)
	}
	if err := roots.Admit(com.Rec); err != nil {
		return fmt.Errorf("failed to reseal: %w", err)
	}
	rec := *com.Rec
	rec.Auth, rec.Seq = format.RootByProvider, rec.Seq+1
	body := rec.MarshalBody()
	sig, err := provider.SignRoot(signer, body)
	if err != nil {
		return err
	}
	if _, err := img.Store.WriteAt(format.MarshalRootSlot(body, sig), h.RootSlotPos(1-com.Slot)); err != nil {
		return fmt.Errorf("failed to reseal: failed to write the root record: %w", err)
	}
	if err := img.Store.Sync(); err != nil {
		return fmt.Errorf("failed to reseal: %w", err)
	}
	slog.Info("root record carried to the new chip", "counter", rec.Counter, "seq", rec.Seq, "root", fmt.Sprintf("%x", rec.Root[:8]))
	return nil
}

type inspectOut struct {
	Image          string   `json:"image"`
	HeaderCopy     string   `json:"header_copy"`
	PrimaryError   string   `json:"primary_error,omitempty"`
	BackupError    string   `json:"backup_error,omitempty"`
	Generation     uint64   `json:"generation"`
	UUID           string   `json:"image_uuid"`
	VirtualSize    uint64   `json:"virtual_size"`
	SectorSize     uint32   `json:"sector_size"`
	Suite          string   `json:"suite"`
	ReadOnly       bool     `json:"read_only"`
	JournalOffset  uint64   `json:"journal_offset"`
	JournalSize    uint64   `json:"journal_size"`
	MetaOffset     uint64   `json:"meta_offset"`
	MetaSize       uint64   `json:"meta_size"`
	DataOffset     uint64   `json:"data_offset"`
	AllocatedBytes int64    `json:"allocated_bytes"`
	AllocatedData  int64    `json:"allocated_data_bytes"`
	Journal        string   `json:"journal"`
	JournalEpoch   uint64   `json:"journal_epoch"`
	JournalRecords int      `json:"journal_records"`
	MeasureAlg     string   `json:"measure_alg"`
	Measurements   []string `json:"measurements"`
	NotBefore      string   `json:"not_before"`
	NotAfter       string   `json:"not_after"`
	ChipID         string   `json:"chip_id"`
	KEM            string   `json:"kem"`
	ProviderAlg    string   `json:"provider_alg"`
	ProviderKey    string   `json:"provider_key_sha256"`
	CertDigest     string   `json:"cert_sha384"`
	Remote         bool     `json:"remote_key"`
	BrokerURL      string   `json:"broker_url,omitempty"`
	KeyID          string   `json:"key_id,omitempty"`
	Signature      string   `json:"signature"`
	SignatureError string   `json:"signature_error,omitempty"`

	// Version 2 (FORMAT.md §7, §8).
	Version    uint16    `json:"format_version"`
	Tree       bool      `json:"integrity_tree"`
	TreeOffset uint64    `json:"tree_offset,omitempty"`
	TreeSize   uint64    `json:"tree_size,omitempty"`
	RootSlots  []rootOut `json:"root_slots,omitempty"`
}

// rootOut is one root record slot as inspect reads it, without checking its authenticator
// (that needs the image's PSP: unseal and scrub do).
type rootOut struct {
	Slot    int    `json:"slot"`
	Auth    string `json:"auth,omitempty"`
	Seq     uint64 `json:"seq,omitempty"`
	Counter uint64 `json:"counter,omitempty"`
	Epoch   uint64 `json:"epoch,omitempty"`
	Head    uint64 `json:"journal_head,omitempty"`
	Root    string `json:"root,omitempty"`
	Error   string `json:"error,omitempty"`
}

// readRootSlots parses both root record slots and returns them with the newest parsable one
// (nil if neither parses).
func readRootSlots(img *image.Image) ([]rootOut, *format.RootRecord) {
	var out []rootOut
	var newest *format.RootRecord
	slot := make([]byte, format.RootSlotSize)
	for i := range 2 {
		r := rootOut{Slot: i}
		clear(slot)
		var rec *format.RootRecord
		_, err := img.Store.ReadAt(slot, img.Header.RootSlotPos(i))
		if err == nil {
			rec, _, _, err = format.ParseRootSlot(slot, img.Header)
		}
		if err != nil {
			r.Error = err.Error()
		} else {
			r.Auth = map[format.RootAuth]string{format.RootByPSP: "psp", format.RootByProvider: "provider"}[rec.Auth]
			r.Seq, r.Counter, r.Epoch, r.Head, r.Root = rec.Seq, rec.Counter, rec.Epoch, rec.Head, hex.EncodeToString(rec.Root[:])
			if newest == nil || rec.Seq > newest.Seq {
				newest = rec
			}
		}
		out = append(out, r)
	}
	return out, newest
}

func inspectCmd() *cobra.Command {
	var asJSON bool
	var trust, pubs []string
	cmd := &cobra.Command{
		Use:   "inspect IMAGE",
		Short: "Show an image's header and certificate (no private key needed)",
		Long: `Prints the header fields, which header copy was used (and why the other was not), the
certificate's public fields, the bytes allocated on disk, the journal state, and the provider
signature verdict against the given trust (--trust DIR and/or --provider-pub FILE, each
repeatable): valid, unknown provider, bad signature, or "not checked" when no trust is given.
No private key is needed, so the journal's MACs are not checked here (unseal checks them).
With --json the output is one object with stable snake_case keys.`,
		Example: "  sealdisk inspect vm.img --trust psp/trust\n  sealdisk inspect vm.img --provider-pub provider/provider.pub\n  sealdisk inspect vm.img --json | jq .signature",
		Args:    cobra.ExactArgs(1),
		RunE: func(cmd *cobra.Command, args []string) error {
			img, err := openImage(args[0], true)
			if err != nil {
				return err
			}
			defer img.Close()
			h, c := img.Header, img.Cert
			o := inspectOut{
				Image: args[0], HeaderCopy: "primary", Generation: h.Generation, UUID: uuid.UUID(h.UUID).String(),
				VirtualSize: h.VirtualSize, SectorSize: h.SectorSize, Suite: h.Suite.String(), ReadOnly: h.ReadOnly,
				JournalOffset: h.JournalOffset, JournalSize: h.JournalSize, MetaOffset: h.MetaOffset, MetaSize: h.MetaSize,
				DataOffset: h.DataOffset, MeasureAlg: c.MeasureAlg.String(),
				NotBefore: c.NotBefore.Format(time.RFC3339), NotAfter: c.NotAfter.Format(time.RFC3339),
				ChipID: hex.EncodeToString(c.ChipID[:]), KEM: format.KEMName(c.KEM), ProviderAlg: c.ProviderAlg.String(),
				Remote: c.Remote, BrokerURL: c.BrokerURL, KeyID: c.KeyID, Signature: "not checked",
			}
			if img.FellBack() {
				o.HeaderCopy = "backup"
			}
			if img.Status.PrimaryErr != nil {
				o.PrimaryError = img.Status.PrimaryErr.Error()
			}
			if img.Status.BackupErr != nil {
				o.BackupError = img.Status.BackupErr.Error()
			}
			for _, m := range c.Measurements {
				o.Measurements = append(o.Measurements, hex.EncodeToString(m))
			}
			pk := sha256.Sum256(c.ProviderKey)
			o.ProviderKey = hex.EncodeToString(pk[:])
			o.CertDigest = hex.EncodeToString(sha384(c.Bytes()))
			if locate.IsRBD(args[0]) {
				// RBD allocates whole objects: the sum of the allocated ones.
				ext, err := img.Store.Extents(0, int64(h.FileSize()))
				if err != nil {
					return err
				}
				for _, e := range ext {
					o.AllocatedBytes += e[1] - e[0]
				}
			} else if fi, err := os.Stat(args[0]); err == nil {
				if st, ok := fi.Sys().(*syscall.Stat_t); ok {
					o.AllocatedBytes = st.Blocks * 512
				}
			}
			if o.AllocatedData, err = img.AllocatedData(); err != nil {
				return err
			}
			o.Version, o.Tree, o.TreeOffset, o.TreeSize = h.Version, h.Tree, h.TreeOffset, h.TreeSize
			if h.Version >= format.HeaderVersion2 {
				var rec *format.RootRecord
				o.RootSlots, rec = readRootSlots(img)
				switch {
				case rec == nil:
					o.Journal = "no root record: the image is not usable"
				case rec.Head == 0 && rec.Epoch == 0:
					o.Journal = "empty"
				case rec.Head == 0:
					o.Journal, o.JournalEpoch = "clean", rec.Epoch
				default:
					o.Journal, o.JournalEpoch = fmt.Sprintf("holds %d bytes of committed blocks (attach or unseal recovers them; not checked here)", rec.Head), rec.Epoch
				}
			} else {
				switch js, err := image.PeekJournal(img); {
				case err != nil:
					o.Journal = "invalid: " + err.Error()
				case js.Epoch == 0:
					o.Journal = "empty"
				case js.Records == 0:
					o.Journal, o.JournalEpoch = "clean", js.Epoch
				default:
					o.Journal, o.JournalEpoch, o.JournalRecords = "holds records (unseal replays them; MACs not checked here)", js.Epoch, js.Records
				}
			}
			if len(trust)+len(pubs) > 0 {
				ts := psp.TrustStore{}
				for _, p := range append(append([]string{}, trust...), pubs...) {
					t, err := psp.LoadTrustStore(p)
					if err != nil {
						return err
					}
					maps.Copy(ts, t)
				}
				switch err := ts.VerifySignature(c); {
				case err == nil:
					o.Signature = "valid"
				case errors.Is(err, psp.ErrUnknownProvider):
					o.Signature, o.SignatureError = "unknown provider", err.Error()
				default:
					o.Signature, o.SignatureError = "bad signature", err.Error()
				}
			}
			w := cmd.OutOrStdout()
			if asJSON {
				e := json.NewEncoder(w)
				e.SetIndent("", "  ")
				return e.Encode(o)
			}
			printInspect(w, &o)
			return nil
		},
	}
	cmd.Flags().BoolVar(&asJSON, "json", false, "print one JSON object")
	cmd.Flags().StringArrayVar(&trust, "trust", nil, "trust store directory (PSPDIR/trust) or a provider .pub file (repeatable)")
	cmd.Flags().StringArrayVar(&pubs, "provider-pub", nil, "provider public key file to check the signature against (repeatable)")
	return cmd
}

func printInspect(w io.Writer, o *inspectOut) {
	p := func(k string, v any) { fmt.Fprintf(w, "%-22s %v\n", k+":", v) }
	p("image", o.Image)
	p("header copy", o.HeaderCopy)
	if o.PrimaryError != "" {
		p("primary header", "INVALID: "+o.PrimaryError)
	}
	if o.BackupError != "" {
		p("backup header", "INVALID: "+o.BackupError)
	}
	p("generation", o.Generation)
	p("image uuid", o.UUID)
	p("virtual size", fmt.Sprintf("%d bytes", o.VirtualSize))
	p("sector size", o.SectorSize)
	p("data suite", o.Suite)
	p("read-only", o.ReadOnly)
	p("format version", o.Version)
	p("regions", fmt.Sprintf("journal %d+%d, metadata %d+%d, data %d", o.JournalOffset, o.JournalSize, o.MetaOffset, o.MetaSize, o.DataOffset))
	if o.Tree {
		p("integrity tree", fmt.Sprintf("%d+%d", o.TreeOffset, o.TreeSize))
	}
	for _, r := range o.RootSlots {
		k := fmt.Sprintf("root slot %d", r.Slot)
		if r.Error != "" {
			p(k, r.Error)
			continue
		}
		p(k, fmt.Sprintf("seq %d, counter %d, epoch %d, head %d, root %s, by %s (not checked)", r.Seq, r.Counter, r.Epoch, r.Head, r.Root, r.Auth))
	}
	p("allocated on disk", fmt.Sprintf("%d bytes (data region %d bytes)", o.AllocatedBytes, o.AllocatedData))
	j := o.Journal
	if o.JournalEpoch > 0 {
		j += fmt.Sprintf(", epoch %d", o.JournalEpoch)
	}
	if o.JournalRecords > 0 {
		j += fmt.Sprintf(", %d records", o.JournalRecords)
	}
	p("journal", j)
	p("measure alg", o.MeasureAlg)
	for _, m := range o.Measurements {
		p("allowed firmware", m)
	}
	p("valid", o.NotBefore+" .. "+o.NotAfter)
	p("chip id", o.ChipID)
	p("kem", o.KEM)
	p("provider", o.ProviderAlg+" key sha256:"+o.ProviderKey)
	p("certificate sha384", o.CertDigest)
	if o.Remote {
		p("remote key", o.BrokerURL+" id "+o.KeyID)
	}
	sig := o.Signature
	if o.SignatureError != "" {
		sig += " (" + o.SignatureError + ")"
	}
	p("signature", sig)
}
