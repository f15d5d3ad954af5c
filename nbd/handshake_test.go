package nbd

import (
	"bytes"
	"encoding/binary"
	"testing"

	"github.com/sealdisk/sealdisk/engine"
)

const testSize = 8 << 20

func twoExports() []Export {
	return []Export{
		{Name: "disk", Description: "the first disk", Device: newTestDevice(testSize, nil)},
		{Name: "ro", Description: "read-only", Device: newTestDevice(1<<20, func(c *engine.Caps) { c.ReadOnly = true })},
	}
}

func TestHandshakeList(t *testing.T) {
	ts := startServer(t, Options{}, twoExports()...)
	c := dialT(t, ts.sock)
	c.greet(flagCFixedNewstyle)
	inter := c.expectOpt(optList, nil, repAck)
	var got []string
	for _, r := range inter {
		if r.typ != repServer {
			t.Fatalf("LIST reply type %#x", r.typ)
		}
		n := binary.BigEndian.Uint32(r.data)
		got = append(got, string(r.data[4:4+n])+"|"+string(r.data[4+n:]))
	}
	want := []string{"disk|the first disk", "ro|read-only"}
	if len(got) != 2 || got[0] != want[0] || got[1] != want[1] {
		t.Fatalf("LIST = %q, want %q", got, want)
	}
	c.expectOpt(optList, []byte{1}, repErrInvalid) // LIST takes no data
	c.expectOpt(optAbort, nil, repAck)
	c.expectClosed()
}

func TestHandshakeInfo(t *testing.T) {
	ts := startServer(t, Options{}, twoExports()...)
	c := dialT(t, ts.sock)
	c.greet(flagCFixedNewstyle | flagCNoZeroes)

	inter := c.expectOpt(optInfo, infoPayload("disk", infoName, infoDescription, infoBlockSize, 999), repAck)
	seen := map[uint16][]byte{}
	for _, r := range inter {
		if r.typ != repInfo {
			t.Fatalf("INFO reply type %#x", r.typ)
		}
		seen[binary.BigEndian.Uint16(r.data)] = r.data[2:]
	}
	if e := seen[infoExport]; len(e) != 10 || binary.BigEndian.Uint64(e) != testSize {
		t.Fatalf("NBD_INFO_EXPORT = % x", e)
	}
	if b := seen[infoBlockSize]; len(b) != 12 || binary.BigEndian.Uint32(b) != 1 ||
		binary.BigEndian.Uint32(b[4:]) != 4096 || binary.BigEndian.Uint32(b[8:]) != 32<<20 {
		t.Fatalf("NBD_INFO_BLOCK_SIZE = % x, want 1/4096/32MiB", b)
	}
	if string(seen[infoName]) != "disk" || string(seen[infoDescription]) != "the first disk" {
		t.Fatalf("name %q description %q", seen[infoName], seen[infoDescription])
	}
	if len(seen) != 4 {
		t.Fatalf("unexpected info types: %v", seen)
	}

	c.expectOpt(optInfo, infoPayload("nope"), repErrUnknown)
	c.expectOpt(optGo, infoPayload("nope"), repErrUnknown)
	// Malformed: name length beyond the payload; info count not matching.
	c.expectOpt(optInfo, []byte{0, 0, 1, 0, 'x', 0, 0}, repErrInvalid)
	c.expectOpt(optInfo, append(infoPayload("disk"), 0), repErrInvalid)
	c.expectOpt(optInfo, nil, repErrInvalid)
	// Still usable: GO works after all the errors.
	c.expectOpt(optGo, infoPayload("disk"), repAck)
	if r := c.do(cmdRead, 0, 0, 512, nil); r.errno != 0 || len(r.data) != 512 {
		t.Fatalf("read after GO: %+v", r)
	}
}

func TestHandshakeOptionErrors(t *testing.T) {
	ts := startServer(t, Options{}, twoExports()...)
	c := dialT(t, ts.sock)
	c.greet(flagCFixedNewstyle)

	c.expectOpt(99, []byte("whatever"), repErrUnsup)
	c.expectOpt(optPeekExport, nil, repErrUnsup)
	c.expectOpt(optStartTLS, nil, repErrPolicy) // no TLS configured
	c.expectOpt(optSetMetaContext, metaPayload("disk", metaBaseAllocation), repErrInvalid)
	c.expectOpt(optStructuredReply, []byte{0}, repErrInvalid)
	c.expectOpt(optStructuredReply, nil, repAck)
	c.expectOpt(optStructuredReply, nil, repErrInvalid) // twice

	// An oversized payload is skipped and refused; the stream stays in sync.
	c.expectOpt(optList, make([]byte, maxOptionPayload+1), repErrTooBig)
	c.expectOpt(optList, nil, repAck)

	// Meta contexts.
	metaNames := func(rs []optReply) (names []string) {
		for _, r := range rs {
			if r.typ != repMetaContext {
				t.Fatalf("meta reply type %#x", r.typ)
			}
			names = append(names, string(r.data[4:]))
		}
		return names
	}
	for _, tc := range []struct {
		opt     uint32
		queries []string
		want    int
	}{
		{optListMetaContext, nil, 1},
		{optListMetaContext, []string{"base:"}, 1},
		{optListMetaContext, []string{"x-other:thing", "qemu:dirty-bitmap:a"}, 0},
		{optSetMetaContext, nil, 0},
		{optSetMetaContext, []string{"base:"}, 0},
		{optSetMetaContext, []string{"base:nothing"}, 0},
		{optSetMetaContext, []string{"base:allocation", "base:allocation"}, 1},
	} {
		got := metaNames(c.expectOpt(tc.opt, metaPayload("disk", tc.queries...), repAck))
		if len(got) != tc.want || (tc.want == 1 && got[0] != metaBaseAllocation) {
			t.Errorf("%s %q = %q, want %d base:allocation", optName(tc.opt), tc.queries, got, tc.want)
		}
	}
	c.expectOpt(optSetMetaContext, metaPayload("disk", "nocolon"), repErrInvalid)
	c.expectOpt(optSetMetaContext, metaPayload("nope", metaBaseAllocation), repErrUnknown)
	c.expectOpt(optListMetaContext, append(metaPayload("disk", "base:"), 1), repErrInvalid)
	// A query count far beyond the payload must not allocate or hang.
	c.expectOpt(optListMetaContext, []byte{0, 0, 0, 0, 0xff, 0xff, 0xff, 0xff}, repErrInvalid)

	// A payload beyond the skip limit ends the connection without being read.
	hdr := binary.BigEndian.AppendUint64(nil, magicOpt)
	hdr = binary.BigEndian.AppendUint32(hdr, optList)
	hdr = binary.BigEndian.AppendUint32(hdr, maxOptionDiscard+1)
	c.write(hdr)
	c.expectClosed()
}

func TestHandshakeBadInput(t *testing.T) {
	ts := startServer(t, Options{}, twoExports()...)
	t.Run("unknown client flags", func(t *testing.T) {
		c := dialT(t, ts.sock)
		c.greet(1 << 5)
		c.expectClosed()
	})
	t.Run("bad option magic", func(t *testing.T) {
		c := dialT(t, ts.sock)
		c.greet(flagCFixedNewstyle)
		c.write(make([]byte, 16))
		c.expectClosed()
	})
	t.Run("export name unknown", func(t *testing.T) {
		c := dialT(t, ts.sock)
		c.greet(flagCFixedNewstyle)
		c.sendOpt(optExportName, []byte("nope"))
		c.expectClosed()
	})
}

func TestExportNameLegacy(t *testing.T) {
	ts := startServer(t, Options{}, twoExports()...)
	for _, noZeroes := range []bool{false, true} {
		c := dialT(t, ts.sock)
		flags := flagCFixedNewstyle
		if noZeroes {
			flags |= flagCNoZeroes
		}
		c.greet(flags)
		c.sendOpt(optExportName, []byte("disk"))
		h := c.read(10)
		if binary.BigEndian.Uint64(h) != testSize || binary.BigEndian.Uint16(h[8:])&tflagHasFlags == 0 {
			t.Fatalf("export name reply % x", h)
		}
		if !noZeroes && !bytes.Equal(c.read(124), make([]byte, 124)) {
			t.Fatal("expected 124 zero bytes")
		}
		// The first transmission reply follows immediately: no zeroes were sent with NO_ZEROES.
		if r := c.do(cmdRead, 0, 0, 4096, nil); r.errno != 0 || len(r.data) != 4096 {
			t.Fatalf("read after EXPORT_NAME: %+v", r)
		}
	}
}

func TestDefaultExport(t *testing.T) {
	ts := startServer(t, Options{DefaultExport: "disk"}, twoExports()...)
	c := openT(t, ts.sock, "", false, false)
	if c.size != testSize {
		t.Fatalf("default export size %d", c.size)
	}
}

func TestTransmissionFlags(t *testing.T) {
	base := tflagHasFlags | tflagSendFlush | tflagSendCache
	for _, tc := range []struct {
		name       string
		mod        func(*engine.Caps)
		structured bool
		want       uint16
	}{
		{"mem", nil, false, base | tflagSendFUA | tflagSendTrim | tflagSendWriteZeroes | tflagSendFastZero | tflagCanMultiConn},
		{"mem structured", nil, true, base | tflagSendFUA | tflagSendTrim | tflagSendWriteZeroes | tflagSendFastZero | tflagCanMultiConn | tflagSendDF},
		{"read-only", func(c *engine.Caps) { c.ReadOnly = true }, false, base | tflagReadOnly | tflagCanMultiConn},
		{"bare", func(c *engine.Caps) {
			*c = engine.Caps{MinBlock: 1, PreferredBlock: 4096, MaxBlock: 1 << 20}
		}, false, base},
		{"zero without fast", func(c *engine.Caps) { c.FastZero = false; c.Trim = false; c.FUA = false }, false,
			base | tflagSendWriteZeroes | tflagCanMultiConn},
		{"fast without zero", func(c *engine.Caps) { c.WriteZeroes = false; c.MultiConn = false }, false,
			base | tflagSendFUA | tflagSendTrim},
	} {
		t.Run(tc.name, func(t *testing.T) {
			ts := startServer(t, Options{}, Export{Name: "d", Device: newTestDevice(1<<20, tc.mod)})
			c := openT(t, ts.sock, "d", tc.structured, false)
			if c.tflags != tc.want {
				t.Fatalf("transmission flags %#x, want %#x", c.tflags, tc.want)
			}
		})
	}
}

func TestAddExportValidation(t *testing.T) {
	s := NewServer(Options{Logger: quietLogger()})
	dev := newTestDevice(1<<20, nil)
	bad := []Export{
		{Name: "nodev"},
		{Name: "x\x00y", Device: dev},
		{Name: string(make([]byte, maxString+1)), Device: dev},
		{Name: "id", Device: dev, AllowedIdentity: "vm1"}, // no TLS configured
		{Name: "min", Device: newTestDevice(1<<20, func(c *engine.Caps) { c.MinBlock = 3 })},
		{Name: "pref", Device: newTestDevice(1<<20, func(c *engine.Caps) { c.PreferredBlock = 256 })},
		{Name: "max", Device: newTestDevice(1<<20, func(c *engine.Caps) { c.MaxBlock = 2048 })},
	}
	for _, e := range bad {
		if err := s.AddExport(e); err == nil {
			t.Errorf("AddExport(%q) accepted", e.Name)
		}
	}
	if err := s.AddExport(Export{Name: "ok", Device: dev}); err != nil {
		t.Fatal(err)
	}
	if err := s.AddExport(Export{Name: "ok", Device: dev}); err == nil {
		t.Error("duplicate export accepted")
	}
	// A device claiming a huge maximum is advertised at the server's cap.
	if err := s.AddExport(Export{Name: "big", Device: newTestDevice(1<<20, func(c *engine.Caps) { c.MaxBlock = 1 << 30 })}); err != nil {
		t.Fatal(err)
	}
	if got := s.exports["big"].maxBlock; got != maxAdvertisedBlock {
		t.Errorf("maximum block %d, want %d", got, maxAdvertisedBlock)
	}
}
