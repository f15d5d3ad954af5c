package main

import (
	"crypto/sha512"
	"encoding/hex"
	"encoding/json"
	"fmt"
	"os"

	"github.com/spf13/cobra"

	"github.com/sealdisk/sealdisk/psp"
)

func sha384(b []byte) []byte { s := sha512.Sum384(b); return s[:] }

func attestCmd() *cobra.Command {
	cmd := &cobra.Command{
		Use:     "attest",
		Short:   "Work with attestation reports",
		Example: "  sealdisk attest verify report.json --vendor-root vendor/vendor.crt --nonce 00112233445566778899aabbccddeeff",
	}
	var root, nonce string
	var asJSON bool
	verify := &cobra.Command{
		Use:   "verify REPORT",
		Short: "Verify an attestation report: chain, signature and nonce",
		Long: `Checks that the report's chip certificate chains to the vendor root, that the chip's
attestation key signed the exact report body, and that the report carries your nonce. Prints
the attested fields (VM, ASID, firmware measurement and verdict, certificate digest and
signature verdict, suite, time). Exits non-zero on any failure.`,
		Example: "  sealdisk attest verify report.json --vendor-root vendor/vendor.crt --nonce $(cat nonce.hex)",
		Args:    cobra.ExactArgs(1),
		RunE: func(cmd *cobra.Command, args []string) error {
			if err := need(map[string]string{"vendor-root": root, "nonce": nonce}); err != nil {
				return err
			}
			n, err := hex.DecodeString(nonce)
			if err != nil {
				return fmt.Errorf("--nonce: not hex: %w", err)
			}
			env, err := os.ReadFile(args[0])
			if err != nil {
				return fmt.Errorf("failed to read report: %w", err)
			}
			rc, err := psp.ReadCertificate(root)
			if err != nil {
				return err
			}
			body, err := psp.VerifyReport(env, psp.RootPool(rc), n)
			if err != nil {
				return fmt.Errorf("report rejected: %w", err)
			}
			w := cmd.OutOrStdout()
			if asJSON {
				e := json.NewEncoder(w)
				e.SetIndent("", "  ")
				return e.Encode(body)
			}
			fmt.Fprintf(w, "report OK: chain, signature and nonce verified\n")
			fmt.Fprintf(w, "chip %s vm %q asid %d disk %d\nfirmware %s %s (%s)\ncertificate sha384 %s (signature %s)\nsuite %s image %s time %s\n",
				body.ChipID, body.VM, body.ASID, body.Disk, body.MeasureAlg, body.FirmwareMeasurement, body.FirmwareVerdict,
				body.CertDigest, body.SignatureVerdict, body.Suite, body.ImageUUID, body.Time)
			if body.ImageCounter != nil {
				fmt.Fprintf(w, "image counter %d root %s\n", *body.ImageCounter, body.ImageRoot)
			}
			return nil
		},
	}
	verify.Flags().StringVar(&root, "vendor-root", "", "vendor root certificate")
	verify.Flags().StringVar(&nonce, "nonce", "", "the nonce you sent, as hex")
	verify.Flags().BoolVar(&asJSON, "json", false, "print the verified report body as JSON")
	cmd.AddCommand(verify)
	return cmd
}
