package nbd

import (
	"context"
	"encoding/binary"
	"io"
	"net"
	"runtime"
	"testing"
	"time"

	"github.com/sealdisk/sealdisk/engine"
)

// fuzzServer serves one small export with a 64 KiB maximum block, so a hostile length
// field cannot hide behind a legitimately large buffer.
func fuzzServer(t testing.TB) *Server {
	s := NewServer(Options{Logger: quietLogger(), MaxInFlight: 8, MaxInFlightBytes: 256 << 10})
	dev := newTestDevice(1<<20, func(c *engine.Caps) { c.MaxBlock = 64 << 10 })
	dev.failReads(512<<10, 4096) // an integrity-error region for the error paths
	if err := s.AddExport(Export{Name: "d", Description: "fuzz", Device: dev}); err != nil {
		t.Fatal(err)
	}
	return s
}

// feed runs one server connection over net.Pipe on input, reading and dropping its output,
// until the server has finished with the connection. It checks what one connection can
// make the server allocate: bounded by the fixed budgets plus a per-input-byte allowance
// (each 28-byte request may legitimately allocate one 64 KiB buffer), never by a length
// field.
func feed(t *testing.T, s *Server, input []byte) {
	client, server := net.Pipe()
	var before, after runtime.MemStats
	runtime.ReadMemStats(&before)
	// A hung connection is a bug too; the fuzzer has no per-input timeout.
	watchdog := time.AfterFunc(20*time.Second, func() {
		buf := make([]byte, 1<<20)
		panic("BUG: nbd fuzz connection hung:\n" + string(buf[:runtime.Stack(buf, true)]))
	})
	defer watchdog.Stop()
	c := s.startConn(context.Background(), server)
	drained := make(chan struct{})
	go func() {
		io.Copy(io.Discard, client)
		close(drained)
	}()
	client.Write(input) // fails once the server hangs up: fine
	client.Close()
	<-c.done
	<-drained
	runtime.ReadMemStats(&after)
	limit := uint64(16<<20) + uint64(len(input))*4096
	if got := after.TotalAlloc - before.TotalAlloc; got > limit {
		t.Fatalf("one connection allocated %d bytes on a %d-byte input (limit %d)", got, len(input), limit)
	}
}

func opt(code uint32, data []byte) []byte { return optBytes(code, data) }

func req(cmd, flags uint16, off uint64, length uint32, payload []byte) []byte {
	b := binary.BigEndian.AppendUint32(nil, magicRequest)
	b = binary.BigEndian.AppendUint16(b, flags)
	b = binary.BigEndian.AppendUint16(b, cmd)
	b = binary.BigEndian.AppendUint64(b, 0x1234)
	b = binary.BigEndian.AppendUint64(b, off)
	b = binary.BigEndian.AppendUint32(b, length)
	return append(b, payload...)
}

func cat(parts ...[]byte) []byte {
	var b []byte
	for _, p := range parts {
		b = append(b, p...)
	}
	return b
}

var clientFlags = binary.BigEndian.AppendUint32(nil, flagCFixedNewstyle|flagCNoZeroes)

func FuzzHandshake(f *testing.F) {
	f.Add(cat(clientFlags, opt(optList, nil), opt(optAbort, nil)))
	f.Add(cat(clientFlags, opt(optInfo, infoPayload("d", infoName, infoDescription, infoBlockSize))))
	f.Add(cat(clientFlags, opt(optStructuredReply, nil), opt(optSetMetaContext, metaPayload("d", metaBaseAllocation)),
		opt(optListMetaContext, metaPayload("d", "base:")), opt(optGo, infoPayload("d")), req(cmdRead, 0, 0, 512, nil)))
	f.Add(cat(clientFlags, opt(optExportName, []byte("d")), req(cmdDisc, 0, 0, 0, nil)))
	f.Add(cat(clientFlags, opt(optStartTLS, nil), opt(99, []byte("x")), opt(optGo, infoPayload("nope"))))
	f.Add(cat(clientFlags, opt(optListMetaContext, []byte{0, 0, 0, 1, 'd', 0xff, 0xff, 0xff, 0xff})))
	f.Add(cat(clientFlags, binary.BigEndian.AppendUint64(nil, magicOpt), []byte{0, 0, 0, 3, 0x7f, 0xff, 0xff, 0xff}))
	f.Add(cat(clientFlags, opt(optInfo, []byte{0xff, 0xff, 0xff, 0xff, 0, 0})))
	f.Add([]byte{0, 0, 0, 0x80})
	s := fuzzServer(f)
	f.Fuzz(func(t *testing.T, input []byte) {
		feed(t, s, input)
	})
}

// FuzzRequests fuzzes the transmission phase: the handshake is done (with structured
// replies and base:allocation when the first byte is odd), the rest is arbitrary.
func FuzzRequests(f *testing.F) {
	w := make([]byte, 4096)
	for _, seed := range [][]byte{
		req(cmdRead, 0, 0, 4096, nil),
		cat(req(cmdWrite, cflagFUA, 100, 4096, w), req(cmdRead, cflagDF, 0, 8192, nil), req(cmdFlush, 0, 0, 0, nil)),
		cat(req(cmdTrim, 0, 0, 1<<20, nil), req(cmdWriteZeroes, cflagNoHole|cflagFastZero, 4096, 65536, nil), req(cmdCache, 0, 0, 1<<20, nil)),
		cat(req(cmdBlockStatus, cflagReqOne, 0, 1<<20, nil), req(cmdBlockStatus, 0, 1<<20-1, 1, nil)),
		cat(req(cmdRead, 0, 512<<10, 8192, nil), req(cmdRead, 0, 1<<20, 1, nil), req(cmdWrite, 0, 0, 1<<30, nil)),
		cat(req(cmdWrite, 0, 0, 65537, nil), req(99, 0xffff, 1<<63, 0xffffffff, nil)),
		cat(req(cmdDisc, 0, 0, 0, nil), req(cmdRead, 0, 0, 1, nil)),
		[]byte("\x25\x60\x95\x13garbage"),
	} {
		f.Add(byte(0), seed)
		f.Add(byte(1), seed)
	}
	s := fuzzServer(f)
	plain := cat(clientFlags, opt(optGo, infoPayload("d")))
	structured := cat(clientFlags, opt(optStructuredReply, nil), opt(optSetMetaContext, metaPayload("d", metaBaseAllocation)),
		opt(optGo, infoPayload("d")))
	f.Fuzz(func(t *testing.T, mode byte, input []byte) {
		prefix := plain
		if mode&1 != 0 {
			prefix = structured
		}
		feed(t, s, cat(prefix, input))
	})
}
