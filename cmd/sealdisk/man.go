package main

import (
	"fmt"
	"os"

	"github.com/spf13/cobra"
	"github.com/spf13/cobra/doc"
)

// manCmd writes a man page for every command (`make man`): sealdisk.1, sealdisk-serve.1,
// sealdisk-psp-trust-add.1, … Hidden: it is for packaging, not for operators.
func manCmd() *cobra.Command {
	cmd := &cobra.Command{
		Use:     "man DIR",
		Example: "  sealdisk man /usr/share/man/man1   # or: make man (into man/)",
		Short:   "Write man pages for every command into DIR",
		Hidden:  true,
		Args:    cobra.ExactArgs(1),
		RunE: func(cmd *cobra.Command, args []string) error {
			if err := os.MkdirAll(args[0], 0o755); err != nil {
				return err
			}
			root := cmd.Root()
			root.DisableAutoGenTag = true // the pages do not change with the day they are made
			hdr := &doc.GenManHeader{Section: "1", Source: "sealdisk " + version, Manual: "sealdisk manual"}
			if err := doc.GenManTree(root, hdr, args[0]); err != nil {
				return fmt.Errorf("failed to write man pages: %w", err)
			}
			return nil
		},
	}
	return cmd
}
