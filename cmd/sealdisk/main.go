// Command sealdisk keeps VM disk images encrypted and authenticated at rest; see README.md.
package main

import (
	"errors"
	"fmt"
	"log/slog"
	"os"
	"strings"

	"github.com/spf13/cobra"

	"github.com/sealdisk/sealdisk/config"
)

// version is set at build time with -ldflags "-X main.version=…".
var version = "dev"

func main() {
	root := newRoot()
	if err := root.Execute(); err != nil {
		fmt.Fprintf(os.Stderr, "sealdisk: %v\n", err)
		os.Exit(1)
	}
}

func newRoot() *cobra.Command {
	var cfgPath string
	root := &cobra.Command{
		Use:   "sealdisk",
		Short: "Encrypted, authenticated VM disk images sealed to a secure processor",
		Long: `sealdisk keeps guest VM disk images encrypted and authenticated at rest. Each image carries a
certificate that seals its key to one host's secure processor (PSP); nobody types a key.

This one binary holds:
  - the service: serve (NBD exports and FUSE files of sealed images for running VMs), admin
    (status, attach, detach, attest, reload of a running serve), attach (an export on a kernel
    NBD device /dev/nbdX) and broker (the remote key broker);
  - the offline tools: vendor, psp and provider (a development vendor CA and PSP, provider
    keys), measure, create, seal, unseal, inspect, reseal, scrub and upgrade (images), state
    (seal a VM's saved state; give it back for a restore) and attest (verify a report).`,
		Example: `  sealdisk vendor init --dir vendor
  sealdisk psp init --dir psp --vendor vendor
  sealdisk provider keygen --dir provider
  sealdisk psp trust add --dir psp provider/provider.pub
  sealdisk seal --in disk.raw --out vm.img --chip psp/chip.crt --vendor-root vendor/vendor.crt \
      --provider-key provider/provider.key --firmware OVMF.fd
  sealdisk inspect vm.img --trust psp/trust`,
		SilenceUsage:  true,
		SilenceErrors: true,
		PersistentPreRunE: func(cmd *cobra.Command, _ []string) error {
			cfg, err := config.Load(cfgPath, cmd.Flags())
			if err != nil {
				return err
			}
			var l slog.Level
			_ = l.UnmarshalText([]byte(cfg.Log.Level)) // validated by config
			opts := &slog.HandlerOptions{Level: l}
			var h slog.Handler = slog.NewTextHandler(os.Stderr, opts)
			if cfg.Log.Format == "json" {
				h = slog.NewJSONHandler(os.Stderr, opts)
			}
			slog.SetDefault(slog.New(h))
			cephConfig = cfg.Ceph.RBD()
			return nil
		},
	}
	root.PersistentFlags().StringVar(&cfgPath, "config", "", "YAML config file (keys also settable as SEALDISK_* environment variables)")
	root.PersistentFlags().String("log-level", "info", "log level: debug, info, warn, error (config log.level)")
	root.PersistentFlags().String("log-format", "text", "log format: text or json (config log.format)")
	root.PersistentFlags().String("ceph-conf", "", "ceph.conf for rbd:POOL/IMAGE images (config ceph.conf)")
	root.PersistentFlags().String("ceph-id", "", "cephx user for rbd: images, without \"client.\" (config ceph.id)")
	root.PersistentFlags().String("ceph-keyring", "", "keyring file of that user (config ceph.keyring); never the key itself")
	root.AddCommand(vendorCmd(), pspCmd(), providerCmd(), measureCmd(), createCmd(), sealCmd(),
		unsealCmd(), inspectCmd(), resealCmd(), scrubCmd(), upgradeCmd(), stateCmd(), attestCmd(), serveCmd(), adminCmd(), attachCmd(), brokerCmd(), versionCmd(), manCmd())
	return root
}

func versionCmd() *cobra.Command {
	return &cobra.Command{
		Use:     "version",
		Short:   "Print the version",
		Example: "  sealdisk version",
		Args:    cobra.NoArgs,
		Run:     func(cmd *cobra.Command, _ []string) { fmt.Fprintln(cmd.OutOrStdout(), "sealdisk", version) },
	}
}

// need returns an error naming the missing required flags.
func need(flags map[string]string) error {
	var missing []string
	for name, v := range flags {
		if v == "" {
			missing = append(missing, "--"+name)
		}
	}
	if len(missing) > 0 {
		return errors.New("missing required flag(s): " + strings.Join(sortStrings(missing), ", "))
	}
	return nil
}

func sortStrings(s []string) []string {
	for i := 1; i < len(s); i++ {
		for j := i; j > 0 && s[j] < s[j-1]; j-- {
			s[j], s[j-1] = s[j-1], s[j]
		}
	}
	return s
}
