package main

import (
	"errors"
	"fmt"
	"os"

	"github.com/sealdisk/sealdisk/store"
	"github.com/sealdisk/sealdisk/store/locate"
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

// claimTemp makes the path tmp free for a new image: a leftover of a tool that crashed is
// removed, one another seal or create is still writing (it holds the lock) is refused.
func claimTemp(out, tmp string) error {
	f, err := locate.Open(tmp, false, cephConfig)
	if errors.Is(err, os.ErrNotExist) {
		return nil
	}
	if err != nil {
		return err
	}
	err = f.Lock(true)
	f.Close()
	if errors.Is(err, store.ErrLocked) {
		return fmt.Errorf("another seal or create is writing --out %s (its %s is locked): %w", out, tmp, err)
	}
	if err != nil {
		return err
	}
	if err := locate.Remove(tmp, cephConfig); err != nil {
		return fmt.Errorf("failed to remove the leftover %s: %w", tmp, err)
	}
	return nil
}
