package main

import (
	"fmt"
	"path/filepath"

	"github.com/spf13/cobra"

	"github.com/sealdisk/sealdisk/format"
	"github.com/sealdisk/sealdisk/provider"
	"github.com/sealdisk/sealdisk/psp"
)

func vendorCmd() *cobra.Command {
	cmd := &cobra.Command{
		Use:     "vendor",
		Short:   "Manage a development vendor root CA",
		Example: `  sealdisk vendor init --dir vendor`,
	}
	var dir, name string
	initCmd := &cobra.Command{
		Use:   "init",
		Short: "Create a development vendor root CA (vendor.key, vendor.crt)",
		Long: `Creates a self-signed ECDSA P-384 root CA that endorses chip identities. It is for development
and tests: a real deployment uses its hardware vendor's root instead. vendor.key is mode 0600.`,
		Example: `  sealdisk vendor init --dir /etc/sealdisk/vendor --name "Example Corp dev vendor"`,
		Args:    cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			if err := need(map[string]string{"dir": dir}); err != nil {
				return err
			}
			if err := psp.InitVendor(dir, name); err != nil {
				return err
			}
			fmt.Fprintf(cmd.OutOrStdout(), "vendor root: %s\n", filepath.Join(dir, psp.VendorCrtFile))
			return nil
		},
	}
	initCmd.Flags().StringVar(&dir, "dir", "", "directory to create the vendor CA in")
	initCmd.Flags().StringVar(&name, "name", "", "common name of the vendor root")
	cmd.AddCommand(initCmd)
	return cmd
}

func pspCmd() *cobra.Command {
	cmd := &cobra.Command{
		Use:     "psp",
		Short:   "Manage a PSP (chip) identity and its trust store",
		Example: "  sealdisk psp init --dir psp --vendor vendor\n  sealdisk psp trust add --dir psp provider/provider.pub",
	}
	var dir, vendor, kem string
	initCmd := &cobra.Command{
		Use:   "init",
		Short: "Create a chip identity endorsed by a vendor",
		Long: `Creates the chip's HPKE key (kem.key; default ML-KEM-768+X25519, or DHKEM(P-384)), its ECDSA
P-384 attestation key (attest.key) and chip.crt, an X.509 certificate from the vendor that
endorses both. Private keys are mode 0600. Give chip.crt to image providers: they seal image
keys to it.`,
		Example: `  sealdisk psp init --dir /var/lib/sealdisk/psp --vendor vendor
  sealdisk psp init --dir psp --vendor vendor --kem p384`,
		Args: cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			if err := need(map[string]string{"dir": dir, "vendor": vendor}); err != nil {
				return err
			}
			id, err := psp.ParseKEM(kem)
			if err != nil {
				return err
			}
			if err := psp.InitChip(dir, vendor, id); err != nil {
				return err
			}
			p, err := psp.Open(dir, psp.Options{})
			if err != nil {
				return err
			}
			chip := p.ID()
			fmt.Fprintf(cmd.OutOrStdout(), "chip id: %x\nchip certificate: %s\n", chip, filepath.Join(dir, psp.ChipCrtFile))
			return nil
		},
	}
	initCmd.Flags().StringVar(&dir, "dir", "", "PSP directory to create")
	initCmd.Flags().StringVar(&vendor, "vendor", "", "vendor directory (vendor.key, vendor.crt)")
	initCmd.Flags().StringVar(&kem, "kem", "mlkem768x25519", "HPKE KEM: mlkem768x25519 or p384")
	trust := &cobra.Command{
		Use:     "trust",
		Short:   "Manage the PSP's trusted provider keys",
		Example: "  sealdisk psp trust add --dir psp provider/provider.pub\n  sealdisk psp trust list --dir psp\n  sealdisk psp trust remove --dir psp 1a2b3c4d5e6f7081.pub",
	}
	var tdir string
	add := &cobra.Command{
		Use:     "add PROVIDER.pub",
		Short:   "Trust a provider's public key",
		Long:    "Copies the provider's PEM public key into the PSP's trust store (DIR/trust). Certificates signed by untrusted providers are refused. A running 'sealdisk serve' accepts the provider after a reload (SIGHUP or 'sealdisk admin reload').",
		Example: "  sealdisk psp trust add --dir psp provider/provider.pub",
		Args:    cobra.ExactArgs(1),
		RunE: func(cmd *cobra.Command, args []string) error {
			if err := need(map[string]string{"dir": tdir}); err != nil {
				return err
			}
			return psp.AddTrustedProvider(tdir, args[0])
		},
	}
	add.Flags().StringVar(&tdir, "dir", "", "PSP directory")
	list := &cobra.Command{
		Use:   "list",
		Short: "List the trusted provider keys",
		Long: `Prints one line per provider key in the PSP's trust store (DIR/trust): its file name (the NAME
'trust remove' takes), the certificate signature algorithm it verifies, and the SHA-256 of the
key (as 'inspect' prints provider_key_sha256).`,
		Example: "  sealdisk psp trust list --dir psp",
		Args:    cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			if err := need(map[string]string{"dir": tdir}); err != nil {
				return err
			}
			keys, err := psp.TrustedProviders(tdir)
			if err != nil {
				return err
			}
			w := cmd.OutOrStdout()
			if len(keys) == 0 {
				fmt.Fprintf(w, "no trusted provider keys in %s\n", filepath.Join(tdir, psp.TrustDir))
			}
			for _, k := range keys {
				fmt.Fprintf(w, "%s  %s  sha256:%s\n", k.Name, k.Alg, k.SHA256)
			}
			return nil
		},
	}
	list.Flags().StringVar(&tdir, "dir", "", "PSP directory")
	remove := &cobra.Command{
		Use:   "remove NAME",
		Short: "Stop trusting a provider's public key",
		Long: `Deletes the provider key NAME (a file name as 'trust list' prints it; .pub may be left off) from
the PSP's trust store. Images that provider signed are refused from then on: by the offline
tools at once, by a running 'sealdisk serve' after a reload (SIGHUP or 'sealdisk admin
reload'). VMs already attached keep running until they are detached; the reload lists them.`,
		Example: "  sealdisk psp trust remove --dir psp 1a2b3c4d5e6f7081.pub",
		Args:    cobra.ExactArgs(1),
		RunE: func(cmd *cobra.Command, args []string) error {
			if err := need(map[string]string{"dir": tdir}); err != nil {
				return err
			}
			if err := psp.RemoveTrustedProvider(tdir, args[0]); err != nil {
				return err
			}
			fmt.Fprintf(cmd.OutOrStdout(), "removed %s; reload a running server (SIGHUP or 'sealdisk admin reload') to refuse it there\n", args[0])
			return nil
		},
	}
	remove.Flags().StringVar(&tdir, "dir", "", "PSP directory")
	trust.AddCommand(add, list, remove)
	cmd.AddCommand(initCmd, trust)
	return cmd
}

func providerCmd() *cobra.Command {
	cmd := &cobra.Command{
		Use:     "provider",
		Short:   "Manage image provider signing keys",
		Example: "  sealdisk provider keygen --dir provider",
	}
	var dir, name, alg string
	keygen := &cobra.Command{
		Use:   "keygen",
		Short: "Create a provider signing key pair (NAME.key, NAME.pub)",
		Long: `Creates the key an image provider signs image certificates with: ECDSA P-384 (default) or
Ed25519. NAME.key is PKCS#8 PEM, mode 0600; NAME.pub goes into each PSP's trust store.`,
		Example: "  sealdisk provider keygen --dir provider --name acme --alg ed25519",
		Args:    cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			if err := need(map[string]string{"dir": dir}); err != nil {
				return err
			}
			a, err := format.ParseSigAlg(alg)
			if err != nil {
				return err
			}
			k, err := provider.GenerateKey(a)
			if err != nil {
				return err
			}
			if err := provider.SaveKeyPair(dir, name, k); err != nil {
				return err
			}
			fmt.Fprintf(cmd.OutOrStdout(), "private key: %s\npublic key: %s\n", filepath.Join(dir, name+".key"), filepath.Join(dir, name+".pub"))
			return nil
		},
	}
	keygen.Flags().StringVar(&dir, "dir", "", "directory for the key pair")
	keygen.Flags().StringVar(&name, "name", "provider", "file name stem")
	keygen.Flags().StringVar(&alg, "alg", "ecdsa-p384", "ecdsa-p384 or ed25519")
	cmd.AddCommand(keygen)
	return cmd
}

func measureCmd() *cobra.Command {
	var alg string
	cmd := &cobra.Command{
		Use:   "measure FIRMWARE",
		Short: "Print a firmware file's measurement",
		Long: `Hashes the VM firmware file (OVMF.fd or BIOS) as the PSP does at launch: SHA-384 by default,
SM3 with --alg sm3. Put the result in certificates with --measurement.`,
		Example: "  sealdisk measure /usr/share/OVMF/OVMF_CODE.fd\n  sealdisk measure --alg sm3 OVMF.fd",
		Args:    cobra.ExactArgs(1),
		RunE: func(cmd *cobra.Command, args []string) error {
			a, err := format.ParseMeasureAlg(alg)
			if err != nil {
				return err
			}
			m, err := psp.Measure(args[0], a)
			if err != nil {
				return err
			}
			fmt.Fprintf(cmd.OutOrStdout(), "%x\n", m)
			return nil
		},
	}
	cmd.Flags().StringVar(&alg, "alg", "sha384", "sha384 or sm3")
	return cmd
}
