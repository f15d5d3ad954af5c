//go:build !rbd

package rbd

import (
	"fmt"

	"github.com/sealdisk/sealdisk/store"
)

// Built reports whether this binary can open RBD images.
const Built = false

// Store is not available without the rbd tag.
type Store struct{ store.Image }

func notBuilt(loc Location) error { return fmt.Errorf("failed to open %s: %w", loc, ErrNotBuilt) }

// Open fails: the binary was built without RBD.
func Open(cfg Config, loc Location, readOnly bool) (*Store, error) { return nil, notBuilt(loc) }

// Create fails: the binary was built without RBD.
func Create(cfg Config, loc Location) (*Store, error) { return nil, notBuilt(loc) }

// Exists fails: the binary was built without RBD.
func Exists(cfg Config, loc Location) (bool, error) { return false, notBuilt(loc) }

// Remove fails: the binary was built without RBD.
func Remove(cfg Config, loc Location) error { return notBuilt(loc) }

// Rename fails: the binary was built without RBD.
func Rename(cfg Config, from, to Location) error { return notBuilt(from) }
