package main

import (
	"crypto"
	"crypto/rand"
	"encoding/hex"
	"fmt"
	"os"
	"strconv"
	"strings"
	"time"

	"github.com/spf13/cobra"

	"github.com/sealdisk/sealdisk/format"
	"github.com/sealdisk/sealdisk/provider"
	"github.com/sealdisk/sealdisk/psp"
	"github.com/sealdisk/sealdisk/sector"
)

// certFlags are the certificate options shared by create and seal.
type certFlags struct {
	signer crypto.Signer // loaded by issue: it also signs a version-2 image's first root record

	chip, vendorRoot, providerKey string
	firmware                      []string
	measurements                  []string
	measureAlg, suite             string
	sectorSize                    uint32
	validFor                      time.Duration
	notBefore, notAfter           string
	readOnly                      bool
	brokerURL, keyID, keyFile     string
	noTree                        bool   // layout, not certificate: version 2 without the integrity tree
	journalSize                   string // layout: the journal region's size ("" = the default)
}

func (f *certFlags) register(cmd *cobra.Command) {
	f.registerCert(cmd)
	fl := cmd.Flags()
	fl.Uint32Var(&f.sectorSize, "sector-size", 4096, "sector size: 4096 or 512")
	fl.BoolVar(&f.readOnly, "read-only", false, "mark the image read-only")
	fl.StringVar(&f.journalSize, "journal-size", "", "journal region size, 1M to 1G in whole MiB (default 256M): bounds what is written between checkpoints")
	fl.BoolVar(&f.noTree, "no-integrity-tree", false, "omit the integrity tree: forged holes and rollbacks of sectors go undetected (whole-image rollback still is); for trusted storage and benchmarks")
	fl.StringVar(&f.brokerURL, "broker-url", "", "remote key broker URL (https://) instead of an embedded key")
	fl.StringVar(&f.keyID, "key-id", "", "key id at the broker")
	fl.StringVar(&f.keyFile, "key-file", "", "with --broker-url: the image key (32 raw bytes, mode 0600), as given to 'broker put'")
}

// registerCert registers the flags of the certificate alone: who signs it, for which chip,
// under which firmware, how long (state seal has these and no image layout).
func (f *certFlags) registerCert(cmd *cobra.Command) {
	fl := cmd.Flags()
	fl.StringVar(&f.chip, "chip", "", "chip certificate (PSPDIR/chip.crt) to seal the image key to")
	fl.StringVar(&f.vendorRoot, "vendor-root", "", "vendor root certificate the chip certificate must chain to")
	fl.StringVar(&f.providerKey, "provider-key", "", "provider private key file (PKCS#8 PEM, mode 0600) that signs the certificate")
	fl.StringArrayVar(&f.firmware, "firmware", nil, "firmware file whose measurement the certificate allows (repeatable)")
	fl.StringArrayVar(&f.measurements, "measurement", nil, "allowed firmware measurement as hex (repeatable)")
	fl.StringVar(&f.measureAlg, "measure-alg", "", "sha384 (default) or sm3 (default with --suite sm4-gcm)")
	fl.StringVar(&f.suite, "suite", "auto", "data suite: auto, aes-256-gcm, chacha20-poly1305, sm4-gcm")
	fl.DurationVar(&f.validFor, "valid-for", 8760*time.Hour, "certificate lifetime from now (or from --not-before)")
	fl.StringVar(&f.notBefore, "not-before", "", "certificate start (RFC 3339); default now")
	fl.StringVar(&f.notAfter, "not-after", "", "certificate end (RFC 3339); overrides --valid-for")
}

func (f *certFlags) suiteID() (format.Suite, error) {
	if f.suite == "auto" || f.suite == "" {
		return sector.DefaultSuite(), nil
	}
	return format.ParseSuite(f.suite)
}

// issue builds the image key and its certificate. The caller zeroises the key.
func (f *certFlags) issue(uuid [16]byte, virtualSize uint64) (*format.Certificate, []byte, error) {
	if err := need(map[string]string{"chip": f.chip, "vendor-root": f.vendorRoot, "provider-key": f.providerKey}); err != nil {
		return nil, nil, err
	}
	remote := f.brokerURL != "" || f.keyID != "" || f.keyFile != ""
	if remote {
		if err := need(map[string]string{"broker-url": f.brokerURL, "key-id": f.keyID, "key-file": f.keyFile}); err != nil {
			return nil, nil, fmt.Errorf("a remote key needs --broker-url, --key-id and --key-file: %w", err)
		}
	}
	if f.sectorSize != 512 && f.sectorSize != 4096 {
		return nil, nil, fmt.Errorf("--sector-size must be 512 or 4096, got %d", f.sectorSize)
	}
	suite, err := f.suiteID()
	if err != nil {
		return nil, nil, fmt.Errorf("--suite: %w", err)
	}
	algName := f.measureAlg
	if algName == "" {
		algName = "sha384"
		if suite == format.SuiteSM4GCM {
			algName = "sm3"
		}
	}
	alg, err := format.ParseMeasureAlg(algName)
	if err != nil {
		return nil, nil, fmt.Errorf("--measure-alg: %w", err)
	}
	var ms [][]byte
	for _, fw := range f.firmware {
		m, err := psp.Measure(fw, alg)
		if err != nil {
			return nil, nil, fmt.Errorf("--firmware: %w", err)
		}
		ms = append(ms, m)
	}
	for _, h := range f.measurements {
		m, err := hex.DecodeString(strings.TrimSpace(h))
		if err != nil || len(m) != alg.DigestSize() {
			return nil, nil, fmt.Errorf("--measurement %q: want %d hex-encoded bytes of %s", h, alg.DigestSize(), alg)
		}
		ms = append(ms, m)
	}
	if len(ms) == 0 {
		return nil, nil, fmt.Errorf("missing required flag: --firmware or --measurement (the firmware the image may boot under)")
	}
	// A minute of slack in not_before absorbs clock skew between this host and the PSP's.
	nb, na := time.Now().Add(-time.Minute), time.Now().Add(f.validFor)
	if f.notBefore != "" {
		if nb, err = time.Parse(time.RFC3339, f.notBefore); err != nil {
			return nil, nil, fmt.Errorf("--not-before: %w", err)
		}
		na = nb.Add(f.validFor)
	}
	if f.notAfter != "" {
		if na, err = time.Parse(time.RFC3339, f.notAfter); err != nil {
			return nil, nil, fmt.Errorf("--not-after: %w", err)
		}
	}
	chip, err := loadChip(f.chip, f.vendorRoot)
	if err != nil {
		return nil, nil, err
	}
	signer, err := provider.LoadSigner(f.providerKey)
	if err != nil {
		return nil, nil, err
	}
	f.signer = signer
	req := provider.IssueRequest{
		Chip: chip, UUID: uuid, VirtualSize: virtualSize, SectorSize: f.sectorSize, Suite: suite,
		MeasureAlg: alg, Measurements: ms, NotBefore: nb, NotAfter: na, ReadOnly: f.readOnly,
	}
	var key []byte
	if remote {
		// The key lives in the broker only: the certificate names it, the data is encrypted
		// with it here.
		if key, err = readImageKeyFile(f.keyFile); err != nil {
			return nil, nil, err
		}
		req.BrokerURL, req.KeyID = f.brokerURL, f.keyID
	} else {
		key = make([]byte, sector.KeySize)
		if _, err := rand.Read(key); err != nil {
			return nil, nil, fmt.Errorf("failed to generate image key: %w", err)
		}
		req.ImageKey = key
	}
	c, err := provider.Issue(signer, req)
	if err != nil {
		clear(key)
		return nil, nil, err
	}
	return c, key, nil
}

// loadChip reads a chip certificate and checks it chains to the vendor root.
func loadChip(chipPath, rootPath string) (*psp.ChipCert, error) {
	b, err := os.ReadFile(chipPath)
	if err != nil {
		return nil, fmt.Errorf("failed to read chip certificate: %w", err)
	}
	chip, err := psp.ParseChipCert(b)
	if err != nil {
		return nil, err
	}
	root, err := psp.ReadCertificate(rootPath)
	if err != nil {
		return nil, err
	}
	if err := chip.VerifyChain(psp.RootPool(root)); err != nil {
		return nil, fmt.Errorf("refusing to seal to chip %s: %w", chipPath, err)
	}
	return chip, nil
}

// parseSize reads 512, 10M, 20G, 1T (powers of two).
func parseSize(arg string) (uint64, error) {
	s := strings.TrimSpace(strings.ToUpper(arg))
	mult := uint64(1)
	for suf, m := range map[string]uint64{"K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40, "P": 1 << 50} {
		if strings.HasSuffix(s, suf) || strings.HasSuffix(s, suf+"IB") || strings.HasSuffix(s, suf+"B") {
			s = strings.TrimSuffix(strings.TrimSuffix(strings.TrimSuffix(s, "IB"), "B"), suf)
			mult = m
			break
		}
	}
	n, err := strconv.ParseUint(s, 10, 64)
	if err != nil || n == 0 {
		return 0, fmt.Errorf("invalid size %q: want a positive number with an optional K, M, G, T suffix", arg)
	}
	if n > (1<<50)/mult {
		return 0, fmt.Errorf("size %q exceeds the 1 PiB maximum", arg)
	}
	return n * mult, nil
}

// layout is the image layout the flags ask for.
func (f *certFlags) layout() (format.Layout, error) {
	l := format.Layout{NoTree: f.noTree}
	if f.journalSize != "" {
		n, err := parseSize(f.journalSize)
		if err != nil {
			return l, fmt.Errorf("--journal-size: %w", err)
		}
		l.JournalSize = n
	}
	return l, nil
}
