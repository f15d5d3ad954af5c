package engine

import (
	"bytes"
	"encoding/binary"
	"fmt"
	"io"
	"log/slog"
	"math/rand"
	"testing"

	"github.com/sealdisk/sealdisk/format"
	"github.com/sealdisk/sealdisk/internal/zeros"
	"github.com/sealdisk/sealdisk/psp"
	"github.com/sealdisk/sealdisk/sector"
	"github.com/sealdisk/sealdisk/store/storetest"
)

// units are the atomic units the crash model keeps or loses whole for an image (FORMAT.md
// §6.1 "Assumption"): a header copy, a 4 KiB root record, and a sector elsewhere — the
// journal, the metadata (harsher than its 64-byte entries need) and the tree are torn at
// sector granularity.
func units(h *format.Header) func(off int64) int64 {
	return func(off int64) int64 {
		switch {
		case off < format.RootSlotOffset:
			return format.HeaderSlotSize
		case off < int64(h.JournalOffset):
			return format.RootSlotSize
		}
		return int64(h.SectorSize)
	}
}

// nonceLog asserts that no (salt, counter) pair ever encrypts two different things: it
// watches every metadata entry and journal record written to the store.
type nonceLog struct {
	t    *testing.T
	h    *format.Header
	seen map[[24]byte][2]uint64 // nonce → (lba, first 8 tag bytes)
}

func (n *nonceLog) note(e []byte, lba uint64) {
	var ent sector.Entry
	copy(ent[:], e)
	if ent.IsZero() {
		return
	}
	var k [24]byte
	copy(k[:], e[:24])
	v := [2]uint64{lba, uint64(e[24]) | uint64(e[25])<<8 | uint64(e[26])<<16 | uint64(e[27])<<24}
	if old, ok := n.seen[k]; ok && old != v {
		n.t.Errorf("nonce reused: salt/counter %x for lba %d and lba %d (or another tag)", k, old[0], lba)
	}
	n.seen[k] = v
}

func (n *nonceLog) onWrite(p []byte, off int64) {
	h := n.h
	switch {
	case off >= int64(h.MetaOffset) && off < int64(h.TreeOffset):
		for i := 0; i+64 <= len(p); i += 64 {
			n.note(p[i:i+64], uint64(off-int64(h.MetaOffset)+int64(i))/64)
		}
	case off >= int64(h.JournalOffset) && off < int64(h.MetaOffset):
		// block headers: every write of the journal starts with one
		for i := 0; i+sector.BlockHeaderSize <= len(p); {
			hdr := p[i : i+sector.BlockHeaderSize]
			if string(hdr[:4]) != "SDJB" {
				return
			}
			count := int(binary.BigEndian.Uint16(hdr[6:]))
			stride := 72 // lba, entry
			if hdr[4] == sector.BlockPlaced {
				stride = 136 // lba, entry, old entry (a nonce noted when it was new)
			}
			for k := range count {
				e := hdr[64+k*stride:]
				n.note(e[8:72], binary.BigEndian.Uint64(e))
			}
			i += sector.BlockLen(hdr[4], count, int(h.SectorSize))
		}
	}
}

// TestCrashConsistency: 1,000 random crash points over mixed unaligned writes, FUA writes,
// flushes, trims and write-zeroes. After each crash the image is reattached (journal
// recovery) and every sector must read, without error, as its content at the last
// durability point or some content it had later. Nonces never repeat, across crashes too.
func TestCrashConsistency(t *testing.T) {
	const sectors, ss = 192, 512
	iterations := 1000
	quiet := slog.New(slog.NewTextHandler(io.Discard, nil))
	r := rand.New(rand.NewSource(42))
	im := newTestImage(t, sectors*ss, ss, 1<<20)
	violations := 0
	var placedSectors, directSectors uint64
	for it := 0; it < iterations; it++ {
		st := &storetest.Crash{Units: units(im.h)}
		im.create(t, st)
		st.Sync()
		nl := &nonceLog{t: t, h: im.h, seen: map[[24]byte][2]uint64{}}
		st.OnWrite = nl.onWrite
		// Two crash points in three write runs of two sectors or more under the cache's
		// pressure in place (placed blocks), the third journals every write-back's data.
		placed := []int64{-1, ss, 2 * ss}[it%3]
		e := New(Options{Shards: 2, CacheBytes: 16 * ss * 2, StripeSectors: 64, Logger: quiet, PlacedBytes: placed})
		d := im.attach(t, e, psp.ASID(1), st)
		// model: acceptable contents per sector since its last durability point
		cur := make([][]byte, sectors)
		ok := make([]map[string]bool, sectors)
		for i := range cur {
			cur[i] = make([]byte, ss)
			ok[i] = map[string]bool{string(cur[i]): true}
		}
		durable := func(lo, hi int64) { // sectors [lo, hi) are durable now
			for s := lo; s < hi; s++ {
				ok[s] = map[string]bool{string(cur[s]): true}
			}
		}
		changed := func(lo, hi int64) {
			for s := lo; s < hi; s++ {
				ok[s][string(cur[s])] = true
			}
		}
		ops := 1 + r.Intn(40)
		var oplog []string
		for op := 0; op < ops; op++ {
			off := r.Int63n(sectors * ss)
			n := 1 + r.Int63n(min(sectors*ss-off, 24*ss))
			if r.Intn(2) == 0 { // whole sectors: with placed runs on, sealed from the buffer (writeDirect)
				off &^= ss - 1
				n = max(n&^(ss-1), ss)
			}
			lo, hi := off/ss, (off+n+ss-1)/ss
			k := r.Intn(10)
			oplog = append(oplog, fmt.Sprintf("%d:[%d,%d)", k, lo, hi))
			switch {
			case k < 5:
				buf := make([]byte, n)
				r.Read(buf)
				fua := k == 0
				must(t, d.WriteAt(ctx, buf, off, fua))
				for i := int64(0); i < n; i++ {
					cur[(off+i)/ss][(off+i)%ss] = buf[i]
				}
				changed(lo, hi)
				if fua {
					durable(lo, hi)
				}
			case k < 7:
				must(t, d.Flush(ctx))
				durable(0, sectors)
			case k < 9:
				fua := r.Intn(3) == 0
				if k == 7 {
					must(t, d.Trim(ctx, off, n, fua))
				} else {
					must(t, d.WriteZeroes(ctx, off, n, ZeroFlags{NoHole: r.Intn(2) == 0, FUA: fua}))
				}
				for i := int64(0); i < n; i++ {
					cur[(off+i)/ss][(off+i)%ss] = 0
				}
				changed(lo, hi)
				if fua {
					durable(lo, hi)
				}
			default:
				buf := make([]byte, n)
				must(t, d.ReadAt(ctx, buf, off))
			}
		}
		placedSectors += e.Stats.Placed.Load()
		directSectors += e.Stats.Direct.Load()
		crashed := st.Crash(r, r.Float64())
		crashed.OnWrite = nl.onWrite
		abandon(e) // the crashed engine is never flushed
		e2 := New(Options{Shards: 2, StripeSectors: 64, Logger: quiet})
		d2 := im.attach(t, e2, 2, crashed)
		for s := int64(0); s < sectors; s++ {
			got := make([]byte, ss)
			if err := d2.ReadAt(ctx, got, s*ss); err != nil {
				violations++
				t.Errorf("iteration %d: sector %d unreadable after crash: %v", it, s, err)
				continue
			}
			if !ok[s][string(got)] {
				violations++
				t.Errorf("iteration %d: sector %d holds content it never had since its last flush (zero=%v, %d acceptable, ops %v)", it, s, zeros.All(got), len(ok[s]), oplog)
			}
		}
		// keep writing after recovery: a new session must not reuse a nonce
		buf := make([]byte, 4*ss)
		r.Read(buf)
		must(t, d2.WriteAt(ctx, buf, 0, true))
		must(t, e2.Close())
		if violations > 5 {
			t.Fatalf("stopping after %d violations", violations)
		}
	}
	if violations != 0 {
		t.Fatalf("%d violations in %d crash points", violations, iterations)
	}
	if placedSectors == directSectors || directSectors == 0 {
		t.Fatalf("%d sectors placed, %d of them sealed from the buffer: both kinds of placed blocks' crash points must be tested", placedSectors, directSectors)
	}
	t.Logf("%d crash points, 0 violations, %d sectors placed, %d of them direct", iterations, placedSectors, directSectors)
}

var _ = bytes.Equal
var _ = fmt.Sprint
