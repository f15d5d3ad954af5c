package main

import (
	"errors"
	"fmt"

	"github.com/sealdisk/sealdisk/store"
)

// The offline tools take the image lock the server takes (docs/OPERATOR.md, "One owner per
// image"): unseal, scrub and upgrade read under a shared lock, reseal rewrites under an
// exclusive one, and seal, create and upgrade write their OUT.tmp under an exclusive one. inspect takes none: it only reads the
// headers, and an operator inspects images that are being served.

// inUse turns a lock refusal of the image at path into advice; other errors pass through.
func inUse(tool, path string, err error) error {
	if errors.Is(err, store.ErrLocked) {
		return fmt.Errorf("%s: %s is in use — detach it from the server ('sealdisk admin detach NAME') or stop that server or tool first: %w", tool, path, err)
	}
	return err
}
