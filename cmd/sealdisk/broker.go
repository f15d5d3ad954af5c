package main

import (
	"context"
	"crypto/rand"
	"errors"
	"fmt"
	"log/slog"
	"os"
	"os/signal"
	"syscall"

	"github.com/spf13/cobra"

	"github.com/sealdisk/sealdisk/broker"
)

func brokerCmd() *cobra.Command {
	cmd := &cobra.Command{
		Use:   "broker",
		Short: "The remote key broker: serve, keys (put, list, revoke, rotate), audit",
		Long: `The key broker holds image keys for certificates made with --broker-url/--key-id, sealed
at rest to the broker's own key, and releases one to a PSP only against a fresh attestation
report that its key id's policy in broker.yaml allows (docs/BROKER.md). Every release and
refusal is in a hash-chained audit log. Several replicas may share one store and identity.`,
		Example: `  sealdisk broker init --identity /etc/sealdisk-broker
  sealdisk broker put --config broker.yaml vm1-disk --generate --key-out vm1.key
  sealdisk broker serve --config broker.yaml
  sealdisk broker audit verify --config broker.yaml`,
		// broker.yaml is not sealdisk.yaml: only the logging flags apply.
		PersistentPreRunE: func(cmd *cobra.Command, _ []string) error {
			lvl, _ := cmd.Flags().GetString("log-level")
			var l slog.Level
			if err := l.UnmarshalText([]byte(lvl)); err != nil {
				return fmt.Errorf("--log-level: %w", err)
			}
			opts := &slog.HandlerOptions{Level: l}
			var h slog.Handler = slog.NewTextHandler(os.Stderr, opts)
			if f, _ := cmd.Flags().GetString("log-format"); f == "json" {
				h = slog.NewJSONHandler(os.Stderr, opts)
			}
			slog.SetDefault(slog.New(h))
			return nil
		},
	}
	cmd.AddCommand(brokerInitCmd(), brokerServeCmd(), brokerPutCmd(), brokerListCmd(), brokerRevokeCmd(), brokerRotateCmd(), brokerAuditCmd())
	return cmd
}

func brokerConfig(cmd *cobra.Command) (*broker.Config, error) {
	p, _ := cmd.Flags().GetString("config")
	if p == "" {
		return nil, errors.New("missing required flag: --config (broker.yaml)")
	}
	return broker.LoadConfig(p)
}

func brokerStore(cmd *cobra.Command) (*broker.Store, error) {
	cfg, err := brokerConfig(cmd)
	if err != nil {
		return nil, err
	}
	return broker.OpenStore(cfg.Store, cfg.Identity)
}

func brokerInitCmd() *cobra.Command {
	var dir string
	cmd := &cobra.Command{
		Use:     "init",
		Short:   "Create a broker identity (at-rest key and nonce secret, mode 0600)",
		Example: "  sealdisk broker init --identity /etc/sealdisk-broker",
		Args:    cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			if err := need(map[string]string{"identity": dir}); err != nil {
				return err
			}
			if err := broker.InitIdentity(dir); err != nil {
				return err
			}
			fmt.Fprintf(cmd.OutOrStdout(), "broker identity in %s (copy it to every replica)\n", dir)
			return nil
		},
	}
	cmd.Flags().StringVar(&dir, "identity", "", "identity directory to create")
	return cmd
}

func brokerServeCmd() *cobra.Command {
	return &cobra.Command{
		Use:   "serve",
		Short: "Serve challenges and releases over HTTPS (TLS 1.3)",
		Long: `Serves POST /v1/challenge, POST /v1/release and GET /metrics on the config's listen address
(tcp:HOST:PORT or unix:PATH), HTTPS only. SIGTERM/SIGINT stop it. A refusal is logged with its
reason and answered only "release refused" with a reference.`,
		Example: "  sealdisk broker serve --config broker.yaml",
		Args:    cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			cfg, err := brokerConfig(cmd)
			if err != nil {
				return err
			}
			if err := cfg.CheckServe(); err != nil {
				return err
			}
			s, err := broker.NewServer(cfg, broker.ServerOptions{})
			if err != nil {
				return err
			}
			ln, err := s.Listen()
			if err != nil {
				return err
			}
			ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
			defer stop()
			slog.Info("broker serving", "listen", cfg.Listen, "store", cfg.Store, "keys_with_policy", len(cfg.Keys))
			err = s.Serve(ctx, ln)
			slog.Info("broker stopped")
			return err
		},
	}
}

func brokerPutCmd() *cobra.Command {
	var keyFile, keyOut string
	var generate bool
	cmd := &cobra.Command{
		Use:   "put KEY-ID",
		Short: "Store an image key under a key id (from a 0600 file, or generated)",
		Long: `Stores a 32-byte image key, sealed to the broker's at-rest key, under KEY-ID. The key comes
from --key-file (32 raw bytes, mode 0600) or, with --generate, is made here and also written to
--key-out (mode 0600) for 'sealdisk create/seal --key-file' — delete that file afterwards.
An existing id, even a revoked one, is refused.`,
		Example: `  sealdisk broker put --config broker.yaml vm1-disk --generate --key-out vm1.key
  sealdisk broker put --config broker.yaml vm2-disk --key-file vm2.key`,
		Args: cobra.ExactArgs(1),
		RunE: func(cmd *cobra.Command, args []string) error {
			var key []byte
			switch {
			case generate && keyOut == "":
				return errors.New("--generate needs --key-out (the image tools need the key once)")
			case generate && keyFile != "":
				return errors.New("--generate and --key-file are exclusive")
			case generate:
				key = make([]byte, 32)
				rand.Read(key)
			case keyFile != "":
				var err error
				if key, err = readImageKeyFile(keyFile); err != nil {
					return err
				}
			default:
				return errors.New("missing required flag: --key-file or --generate")
			}
			defer clear(key)
			st, err := brokerStore(cmd)
			if err != nil {
				return err
			}
			if generate {
				f, err := os.OpenFile(keyOut, os.O_WRONLY|os.O_CREATE|os.O_EXCL, 0o600)
				if err != nil {
					return fmt.Errorf("--key-out: %w", err)
				}
				_, err = f.Write(key)
				if cerr := f.Close(); err == nil {
					err = cerr
				}
				if err != nil {
					os.Remove(keyOut)
					return fmt.Errorf("--key-out: %w", err)
				}
			}
			if err := st.Put(args[0], key); err != nil {
				if generate {
					os.Remove(keyOut)
				}
				return err
			}
			fmt.Fprintf(cmd.OutOrStdout(), "stored key %q\n", args[0])
			return nil
		},
	}
	cmd.Flags().StringVar(&keyFile, "key-file", "", "file holding the 32-byte key (mode 0600)")
	cmd.Flags().BoolVar(&generate, "generate", false, "generate the key")
	cmd.Flags().StringVar(&keyOut, "key-out", "", "with --generate: also write the key here (mode 0600)")
	return cmd
}

func brokerListCmd() *cobra.Command {
	return &cobra.Command{
		Use:     "list",
		Short:   "List the key ids in the store (never the keys)",
		Example: "  sealdisk broker list --config broker.yaml",
		Args:    cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			cfg, err := brokerConfig(cmd)
			if err != nil {
				return err
			}
			st, err := broker.OpenStore(cfg.Store, cfg.Identity)
			if err != nil {
				return err
			}
			list, err := st.List()
			if err != nil {
				return err
			}
			w := cmd.OutOrStdout()
			for _, k := range list {
				state := "active"
				if k.Revoked != "" {
					state = "revoked " + k.Revoked
				}
				pol := "policy"
				if cfg.Keys[k.KeyID] == nil {
					pol = "no policy (never released)"
				}
				fmt.Fprintf(w, "%s\tcreated %s\t%s\t%s\tsealed to %s\n", k.KeyID, k.Created, state, pol, k.SealedTo)
			}
			return nil
		},
	}
}

func brokerRevokeCmd() *cobra.Command {
	return &cobra.Command{
		Use:   "revoke KEY-ID",
		Short: "Revoke a key: every replica refuses it from the next fetch on",
		Long: `Marks KEY-ID revoked in the shared store. Running VMs keep the key until their lease ends
(or detach them at once with 'sealdisk admin detach'). Revocation is final.`,
		Example: "  sealdisk broker revoke --config broker.yaml vm1-disk",
		Args:    cobra.ExactArgs(1),
		RunE: func(cmd *cobra.Command, args []string) error {
			st, err := brokerStore(cmd)
			if err != nil {
				return err
			}
			if err := st.Revoke(args[0]); err != nil {
				return err
			}
			fmt.Fprintf(cmd.OutOrStdout(), "revoked key %q\n", args[0])
			return nil
		},
	}
}

func brokerRotateCmd() *cobra.Command {
	return &cobra.Command{
		Use:   "rotate",
		Short: "Replace the broker's at-rest key and reseal every stored key to it",
		Long: `Makes a new at-rest key, reseals every key file to it (each replaced atomically), and
installs it as broker.key (the previous one stays as broker.key.old). Running replicas pick it
up by themselves. An interrupted rotate is finished by running it again. The image keys
themselves do not change (they encrypt the images).`,
		Example: "  sealdisk broker rotate --config broker.yaml",
		Args:    cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			st, err := brokerStore(cmd)
			if err != nil {
				return err
			}
			n, err := st.Rotate()
			if err != nil {
				return err
			}
			fmt.Fprintf(cmd.OutOrStdout(), "resealed %d key(s) to a new broker key\n", n)
			return nil
		},
	}
}

func brokerAuditCmd() *cobra.Command {
	cmd := &cobra.Command{Use: "audit", Short: "Check the audit log", Example: "  sealdisk broker audit verify --config broker.yaml"}
	cmd.AddCommand(&cobra.Command{
		Use:     "verify",
		Short:   "Verify the audit log's hash chain",
		Example: "  sealdisk broker audit verify --config broker.yaml",
		Args:    cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			cfg, err := brokerConfig(cmd)
			if err != nil {
				return err
			}
			n, head, err := broker.VerifyAudit(cfg.AuditLog, cfg.Identity)
			if err != nil {
				return fmt.Errorf("audit log %s: %w", cfg.AuditLog, err)
			}
			fmt.Fprintf(cmd.OutOrStdout(), "audit log %s: %d entries, chain intact, head %s\n", cfg.AuditLog, n, head)
			return nil
		},
	})
	return cmd
}
