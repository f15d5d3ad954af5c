package format

import (
	"encoding/binary"
	"errors"
	"fmt"

	"github.com/sealdisk/sealdisk/internal/zeros"
)

// Root record slot layout (version 2, FORMAT.md §8), big-endian, RootSlotSize bytes each at
// RootSlotPos(0) and RootSlotPos(1). The body is what the authenticator covers.
//
//	off  size  field         rule
//	0    8     magic         "SDROOT02"
//	8    1     auth          1: HMAC-SHA256 by the chip's PSP; 2: signature by the provider
//	9    7     reserved      zero
//	16   16    image_uuid    the header's
//	32   8     seq           +1 on every commit; the valid slot with the higher seq is current
//	40   8     counter       the rollback counter the PSP keeps for the image
//	48   8     epoch         the data journal's epoch
//	56   8     head          bytes of the epoch's journal this record commits
//	64   32    head_digest   chain digest after the last committed journal block
//	96   32    root          digest of the integrity tree's top node (zero: empty, or no tree)
//	128  2     tree_arity    128 (0 without the tree)
//	130  2     tree_levels   levels of the tree over the header's pages (0 without the tree)
//	132  4     settled       journal blocks of the epoch (by seq) whose placed sectors are durable
//	136  2     auth_len      n: 32 for a MAC, ≤ 512 for a signature
//	138  n     authenticator
//	             zero to the end of the slot
//
// An all-zero slot holds no record.

const (
	RootMagic    = "SDROOT02"
	RootBodySize = 136
	maxRootAuth  = 512
)

// RootAuth says who authenticated a root record.
type RootAuth uint8

const (
	RootByPSP      RootAuth = 1 // HMAC under a key only the chip's PSP holds
	RootByProvider RootAuth = 2 // the provider's signature: a new image, or one resealed to another chip
)

// RootRecord is one parsed root record.
type RootRecord struct {
	Auth       RootAuth
	UUID       [16]byte
	Seq        uint64
	Counter    uint64
	Epoch      uint64
	Head       uint64
	HeadDigest [32]byte
	Root       [32]byte
	TreeArity  uint16
	TreeLevels uint16
	// Settled: the placed blocks of the epoch with seq below it had their sectors' ciphertexts
	// in the data region before a sync that preceded this record (FORMAT.md §6.2).
	Settled uint32
}

// ErrNoRoot: the slot holds no root record (all zero).
var ErrNoRoot = errors.New("no root record in the slot")

// RootFor is the record of an image committing nothing yet: the tree parameters of h, every
// other field zero (the caller sets them).
func RootFor(h *Header) *RootRecord {
	r := &RootRecord{UUID: h.UUID}
	if h.Tree {
		r.TreeArity, r.TreeLevels = TreeArity, uint16(len(TreeLevels(h.Pages())))
	}
	return r
}

// MarshalBody encodes the bytes the authenticator covers.
func (r *RootRecord) MarshalBody() []byte {
	w := writer{b: make([]byte, 0, RootBodySize)}
	w.str(RootMagic)
	w.raw([]byte{byte(r.Auth), 0, 0, 0, 0, 0, 0, 0})
	w.raw(r.UUID[:])
	w.u64(r.Seq)
	w.u64(r.Counter)
	w.u64(r.Epoch)
	w.u64(r.Head)
	w.raw(r.HeadDigest[:])
	w.raw(r.Root[:])
	w.u16(r.TreeArity)
	w.u16(r.TreeLevels)
	w.u32(r.Settled)
	return w.b
}

// MarshalRootSlot is a whole slot: body (from MarshalBody) and its authenticator.
func MarshalRootSlot(body, auth []byte) []byte {
	if len(body) != RootBodySize || len(auth) == 0 || len(auth) > maxRootAuth {
		panic(fmt.Sprintf("BUG: format: root slot with a %d-byte body and a %d-byte authenticator", len(body), len(auth)))
	}
	b := make([]byte, RootSlotSize)
	copy(b, body)
	binary.BigEndian.PutUint16(b[RootBodySize:], uint16(len(auth)))
	copy(b[RootBodySize+2:], auth)
	return b
}

// ParseRootSlot decodes a slot for the image with header h: the record, the body bytes its
// authenticator covers, and the authenticator, which the caller (the PSP) checks. ErrNoRoot for
// an empty slot; a *FieldError naming the field for anything malformed.
func ParseRootSlot(slot []byte, h *Header) (rec *RootRecord, body, auth []byte, err error) {
	if len(slot) != RootSlotSize {
		panic("BUG: format: root slot buffer size")
	}
	if zeros.All(slot) {
		return nil, nil, nil, ErrNoRoot
	}
	r := &reader{b: slot, where: "root record"}
	if m := r.take("magic", 8); m != nil && string(m) != RootMagic {
		r.fail("magic", fmt.Sprintf("is %q, not %q", m, RootMagic))
	}
	rec = &RootRecord{}
	rec.Auth = RootAuth(r.u8("auth"))
	if r.err == nil && rec.Auth != RootByPSP && rec.Auth != RootByProvider {
		r.check("auth", fmt.Sprintf("unknown kind %d", rec.Auth))
	}
	if res := r.take("reserved", 7); !zeros.All(res) {
		r.check("reserved", "is not zero")
	}
	rec.UUID = r.array16("image_uuid")
	if r.err == nil && rec.UUID != h.UUID {
		r.check("image_uuid", fmt.Sprintf("%x is not the image's %x", rec.UUID, h.UUID))
	}
	rec.Seq = r.u64("seq")
	rec.Counter = r.u64("counter")
	rec.Epoch = r.u64("epoch")
	rec.Head = r.u64("head")
	if r.err == nil && rec.Head > h.JournalSize {
		r.check("head", fmt.Sprintf("%d is beyond the %d-byte journal", rec.Head, h.JournalSize))
	}
	copy(rec.HeadDigest[:], r.take("head_digest", 32))
	copy(rec.Root[:], r.take("root", 32))
	rec.TreeArity = r.u16("tree_arity")
	rec.TreeLevels = r.u16("tree_levels")
	if want := RootFor(h); r.err == nil && (rec.TreeArity != want.TreeArity || rec.TreeLevels != want.TreeLevels) {
		r.check("tree_levels", fmt.Sprintf("arity %d, %d levels; the image's tree has arity %d, %d levels", rec.TreeArity, rec.TreeLevels, want.TreeArity, want.TreeLevels))
	}
	rec.Settled = r.u32("settled")
	n := int(r.u16("auth_len"))
	if r.err == nil && (n == 0 || n > maxRootAuth) {
		r.check("auth_len", fmt.Sprintf("%d is outside [1, %d]", n, maxRootAuth))
	}
	auth = r.take("authenticator", n)
	if r.err == nil && !zeros.All(slot[RootBodySize+2+n:]) {
		r.check("authenticator", "trailing bytes after it are not zero")
	}
	if r.err != nil {
		return nil, nil, nil, r.err
	}
	return rec, slot[:RootBodySize], auth, nil
}
