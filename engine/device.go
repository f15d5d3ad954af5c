package engine

import (
	"context"
	"errors"
)

// BlockDevice is the block-device API the frontends (nbd, fusefs) call. The engine's attached
// VM disk implements it; so does MemDevice, the plain in-memory reference the conformance
// suite compares against. Offsets and lengths are in bytes and need not be sector-aligned:
// alignment, read-modify-write and ordering are the engine's job, never a frontend's.
//
// Errors callers branch on are the sentinels below (wrapped); a frontend maps them to its
// wire errno in one place.
type BlockDevice interface {
	// Size is the virtual disk size in bytes.
	Size() int64
	// Caps says what the device supports; a frontend advertises exactly this.
	Caps() Caps
	ReadAt(ctx context.Context, p []byte, off int64) error
	// WriteAt writes p at off; with fua the data is durable when it returns.
	WriteAt(ctx context.Context, p []byte, off int64, fua bool) error
	// Flush makes every write acknowledged before the call durable, whichever caller made it.
	Flush(ctx context.Context) error
	// Trim discards [off, off+n) (any length within the device): it reads back as zeros and
	// takes no space; with fua that is durable when it returns.
	Trim(ctx context.Context, off, n int64, fua bool) error
	// WriteZeroes makes [off, off+n) (any length within the device) read as zeros; with
	// NoHole the space stays allocated. With FastZero it fails with ErrNotFast instead of
	// doing slow work; with FUA it is durable when it returns.
	WriteZeroes(ctx context.Context, off, n int64, flags ZeroFlags) error
	// BlockStatus describes [off, off+n) as a list of extents, in order, covering at least
	// the first byte and at most n bytes.
	BlockStatus(ctx context.Context, off, n int64) ([]Extent, error)
}

// Caps are the capabilities of a BlockDevice.
type Caps struct {
	ReadOnly    bool
	FUA         bool
	Trim        bool
	WriteZeroes bool
	FastZero    bool
	BlockStatus bool
	// MultiConn: a Flush through any handle covers writes acknowledged through every other.
	MultiConn bool
	// Block sizes in bytes: minimum (the size below which writes need read-modify-write is
	// still 1: any size is accepted), preferred, and the largest single request.
	MinBlock, PreferredBlock, MaxBlock uint32
}

// ZeroFlags modify WriteZeroes.
type ZeroFlags struct {
	NoHole   bool
	FastZero bool
	FUA      bool
}

// Extent is one run of BlockStatus.
type Extent struct {
	Length int64
	Hole   bool // not allocated
	Zero   bool // reads as zeros
}

var (
	// ErrOutOfRange: the request reaches past Size or has a negative offset/length.
	ErrOutOfRange = errors.New("request out of range")
	// ErrReadOnly: a write-class request on a read-only device.
	ErrReadOnly = errors.New("device is read-only")
	// ErrTooLarge: a single request above Caps().MaxBlock.
	ErrTooLarge = errors.New("request too large")
	// ErrPermission: no key is bound to the descriptor's ASID, or the ASID does not match.
	ErrPermission = errors.New("permission denied: no key bound to this ASID")
	// ErrIntegrity: a sector failed authentication, or its metadata page the integrity tree
	// (tampered, rolled back or corrupt); never data.
	ErrIntegrity = errors.New("integrity check failed")
	// ErrNotFast: FastZero was requested and zeroing would be slow.
	ErrNotFast = errors.New("fast zero not possible")
	// ErrDetached: the VM disk was detached (or the engine closed) while the request ran.
	ErrDetached = errors.New("device detached")
)
