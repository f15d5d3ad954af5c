package nbd

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"math/rand/v2"
	"syscall"
	"testing"
	"time"

	"github.com/sealdisk/sealdisk/engine"
)

func pattern(n int, seed uint64) []byte {
	r := rand.New(rand.NewPCG(seed, 0))
	b := make([]byte, n)
	for i := range b {
		b[i] = byte(r.Uint32())
	}
	return b
}

func TestReadWrite(t *testing.T) {
	for _, structured := range []bool{false, true} {
		t.Run(fmt.Sprintf("structured=%v", structured), func(t *testing.T) {
			dev := newTestDevice(testSize, nil)
			ts := startServer(t, Options{}, Export{Name: "d", Device: dev})
			c := openT(t, ts.sock, "d", structured, structured)

			// Edges: 0, 1, 4095, 4096, 4097 bytes, unaligned head and tail, a chunk boundary.
			for i, tc := range []struct{ off, n int }{
				{0, 1}, {4095, 1}, {4095, 4097}, {65530, 12}, {100, 4095}, {testSize - 4097, 4097}, {1 << 20, 1 << 20},
			} {
				p := pattern(tc.n, uint64(i))
				if r := c.do(cmdWrite, 0, uint64(tc.off), uint32(tc.n), p); r.errno != 0 {
					t.Fatalf("write %d@%d: %v", tc.n, tc.off, r.errno)
				}
				r := c.do(cmdRead, 0, uint64(tc.off), uint32(tc.n), nil)
				if r.errno != 0 || !bytes.Equal(r.data, p) {
					t.Fatalf("read back %d@%d: errno %v, equal %v", tc.n, tc.off, r.errno, bytes.Equal(r.data, p))
				}
			}
			// Zero-length requests succeed and do nothing.
			if r := c.do(cmdRead, 0, 5, 0, nil); r.errno != 0 || len(r.data) != 0 {
				t.Fatalf("zero read: %+v", r)
			}
			if r := c.do(cmdWrite, 0, testSize, 0, nil); r.errno != 0 {
				t.Fatalf("zero write at the end: %v", r.errno)
			}
			// FUA write, flush, trim and write zeroes.
			p := pattern(8192, 99)
			if r := c.do(cmdWrite, cflagFUA, 8192, 8192, p); r.errno != 0 {
				t.Fatalf("FUA write: %v", r.errno)
			}
			if r := c.do(cmdFlush, 0, 0, 0, nil); r.errno != 0 {
				t.Fatalf("flush: %v", r.errno)
			}
			if r := c.do(cmdWriteZeroes, cflagFUA, 8192, 4096, nil); r.errno != 0 {
				t.Fatalf("write zeroes: %v", r.errno)
			}
			if r := c.do(cmdRead, 0, 8192, 8192, nil); !bytes.Equal(r.data[:4096], make([]byte, 4096)) || !bytes.Equal(r.data[4096:], p[4096:]) {
				t.Fatal("write zeroes did not zero exactly its range")
			}
			if r := c.do(cmdTrim, 0, 0, testSize, nil); r.errno != 0 {
				t.Fatalf("trim of the whole export (above the maximum block): %v", r.errno)
			}
			if r := c.do(cmdRead, 0, 4095, 4097, nil); !bytes.Equal(r.data, make([]byte, 4097)) {
				t.Fatal("trimmed range does not read as zeros")
			}
			if r := c.do(cmdCache, 0, 0, 1<<20, nil); r.errno != 0 {
				t.Fatalf("cache: %v", r.errno)
			}
			if dev.flushes.Load() != 1 || dev.fuaZero.Load() != 1 {
				t.Fatalf("flushes %d, FUA write-zeroes %d: FLUSH and the FUA flag of write zeroes must reach the device", dev.flushes.Load(), dev.fuaZero.Load())
			}
		})
	}
}

func TestBlockStatus(t *testing.T) {
	dev := newTestDevice(testSize, nil)
	ts := startServer(t, Options{}, Export{Name: "d", Device: dev})
	c := openT(t, ts.sock, "d", true, true)
	const chunk = 64 << 10 // MemDevice's allocation unit
	c.do(cmdWrite, 0, 2*chunk, 100, pattern(100, 1))

	r := c.do(cmdBlockStatus, 0, 0, 4*chunk, nil)
	want := []desc{{2 * chunk, stateHole | stateZero}, {chunk, 0}, {chunk, stateHole | stateZero}}
	if r.errno != 0 || fmt.Sprint(r.descs) != fmt.Sprint(want) {
		t.Fatalf("block status = %v (errno %v), want %v", r.descs, r.errno, want)
	}
	r = c.do(cmdBlockStatus, cflagReqOne, 100, chunk, nil)
	if len(r.descs) != 1 || r.descs[0] != (desc{chunk, stateHole | stateZero}) {
		t.Fatalf("REQ_ONE block status = %v", r.descs)
	}
	// A length beyond the maximum block is a hint: the reply covers a prefix.
	r = c.do(cmdBlockStatus, 0, 0, testSize, nil)
	var sum uint32
	for _, d := range r.descs {
		sum += d.length
	}
	if r.errno != 0 || sum == 0 || sum > testSize {
		t.Fatalf("whole-export block status: %v errno %v", r.descs, r.errno)
	}
	// Trim makes it a hole again.
	c.do(cmdTrim, 0, 2*chunk, chunk, nil)
	r = c.do(cmdBlockStatus, 0, 0, 4*chunk, nil)
	if len(r.descs) != 1 || r.descs[0] != (desc{4 * chunk, stateHole | stateZero}) {
		t.Fatalf("after trim: %v", r.descs)
	}
}

// TestValidation sends every kind of invalid request and checks the errno and that the
// connection still works afterwards.
func TestValidation(t *testing.T) {
	const size = 64 << 20
	aligned := func(c *engine.Caps) { c.MinBlock = 512; c.MaxBlock = 1 << 20 }
	exports := []Export{
		{Name: "rw", Device: newTestDevice(size, nil)},
		{Name: "ro", Device: newTestDevice(size, func(c *engine.Caps) { c.ReadOnly = true })},
		{Name: "al", Device: newTestDevice(size, aligned)},
		{Name: "bare", Device: newTestDevice(size, func(c *engine.Caps) {
			*c = engine.Caps{MinBlock: 1, PreferredBlock: 4096, MaxBlock: 1 << 20}
		})},
	}
	maxB := uint32(32 << 20)
	for _, tc := range []struct {
		name          string
		export        string
		structured    bool
		cmd, flags    uint16
		off           uint64
		length        uint32
		payload, want bool // payload: send length bytes
		errno         Errno
	}{
		{name: "read past end", export: "rw", cmd: cmdRead, off: size - 1, length: 2, errno: EINVAL},
		{name: "read past end structured", export: "rw", structured: true, cmd: cmdRead, off: size, length: 1, errno: EINVAL},
		{name: "read offset overflow", export: "rw", cmd: cmdRead, off: 1<<64 - 1, length: 2, errno: EINVAL},
		{name: "write past end", export: "rw", cmd: cmdWrite, off: size - 1, length: 2, payload: true, errno: ENOSPC},
		{name: "write zeroes past end", export: "rw", cmd: cmdWriteZeroes, off: size, length: 1, errno: ENOSPC},
		{name: "trim past end", export: "rw", cmd: cmdTrim, off: size, length: 1, errno: EINVAL},
		{name: "cache past end", export: "rw", cmd: cmdCache, off: size, length: 1, errno: EINVAL},
		{name: "block status past end", export: "rw", structured: true, cmd: cmdBlockStatus, off: size, length: 1, errno: EINVAL},
		{name: "read above max block", export: "bare", cmd: cmdRead, length: 1<<20 + 1, errno: EINVAL},
		{name: "write above max block", export: "bare", cmd: cmdWrite, length: 1<<20 + 1, payload: true, errno: EINVAL},
		{name: "write above max block past end", export: "bare", cmd: cmdWrite, off: size - 1, length: 1<<20 + 1, payload: true, errno: ENOSPC},
		{name: "write 32MiB+1", export: "rw", cmd: cmdWrite, length: maxB + 1, payload: true, errno: EINVAL},
		{name: "unknown command", export: "rw", cmd: 42, errno: EINVAL},
		{name: "unknown command structured", export: "rw", structured: true, cmd: 42, errno: EINVAL},
		{name: "unknown flag", export: "rw", cmd: cmdRead, flags: 1 << 9, length: 1, errno: EINVAL},
		{name: "NO_HOLE on write", export: "rw", cmd: cmdWrite, flags: cflagNoHole, length: 1, payload: true, errno: EINVAL},
		{name: "FAST_ZERO on trim", export: "rw", cmd: cmdTrim, flags: cflagFastZero, length: 1, errno: EINVAL},
		{name: "REQ_ONE on read", export: "rw", cmd: cmdRead, flags: cflagReqOne, length: 1, errno: EINVAL},
		{name: "DF without structured", export: "rw", cmd: cmdRead, flags: cflagDF, length: 1, errno: EINVAL},
		{name: "DF on write", export: "rw", structured: true, cmd: cmdWrite, flags: cflagDF, length: 1, payload: true, errno: EINVAL},
		{name: "flush with offset", export: "rw", cmd: cmdFlush, off: 1, errno: EINVAL},
		{name: "flush with length", export: "rw", cmd: cmdFlush, length: 1, errno: EINVAL},
		{name: "block status without meta", export: "rw", structured: true, cmd: cmdBlockStatus, length: 1, errno: EINVAL},
		{name: "block status without structured", export: "rw", cmd: cmdBlockStatus, length: 1, errno: EINVAL},
		{name: "write read-only", export: "ro", cmd: cmdWrite, length: 10, payload: true, errno: EPERM},
		{name: "trim read-only", export: "ro", cmd: cmdTrim, length: 10, errno: EPERM},
		{name: "write zeroes read-only", export: "ro", cmd: cmdWriteZeroes, length: 10, errno: EPERM},
		{name: "FUA not advertised", export: "ro", cmd: cmdRead, flags: cflagFUA, length: 10, errno: EINVAL},
		{name: "trim not advertised", export: "bare", cmd: cmdTrim, length: 10, errno: EINVAL},
		{name: "write zeroes not advertised", export: "bare", cmd: cmdWriteZeroes, length: 10, errno: EINVAL},
		{name: "FAST_ZERO not advertised", export: "bare", cmd: cmdWrite, flags: cflagFastZero, length: 1, payload: true, errno: EINVAL},
		{name: "unaligned read offset", export: "al", cmd: cmdRead, off: 1, length: 512, errno: EINVAL},
		{name: "unaligned write length", export: "al", cmd: cmdWrite, length: 513, payload: true, errno: EINVAL},
		{name: "unaligned trim", export: "al", cmd: cmdTrim, off: 256, length: 512, errno: EINVAL},
		{name: "zero-length block status", export: "rw", structured: true, cmd: cmdBlockStatus, length: 0, errno: EINVAL},
		{name: "FUA on read is accepted", export: "rw", cmd: cmdRead, flags: cflagFUA, length: 10, errno: 0},
		{name: "FUA on flush is accepted", export: "rw", cmd: cmdFlush, flags: cflagFUA, errno: 0},
	} {
		t.Run(tc.name, func(t *testing.T) {
			ts := startServer(t, Options{}, exports...)
			meta := tc.structured && tc.name != "block status without meta"
			if tc.cmd == cmdBlockStatus && tc.name == "block status past end" || tc.name == "zero-length block status" {
				meta = true
			}
			c := openT(t, ts.sock, tc.export, tc.structured, meta)
			var payload []byte
			if tc.payload {
				payload = make([]byte, tc.length)
			}
			r := c.do(tc.cmd, tc.flags, tc.off, tc.length, payload)
			if r.errno != tc.errno {
				t.Fatalf("errno %v, want %v", r.errno, tc.errno)
			}
			if tc.errno != 0 && tc.structured && (r.msg == "" || r.data != nil) {
				t.Fatalf("structured error without message or with data: %+v", r)
			}
			// The connection keeps working.
			if r := c.do(cmdRead, 0, 0, 512, nil); r.errno != 0 || len(r.data) != 512 {
				t.Fatalf("read after the refused request: %+v", r)
			}
		})
	}
}

func TestHugeWritePayloadCloses(t *testing.T) {
	ts := startServer(t, Options{}, Export{Name: "d", Device: newTestDevice(1<<20, nil)})
	c := openT(t, ts.sock, "d", false, false)
	c.send(cmdWrite, 0, 1, 0, maxWriteDiscard+1, nil) // header only: the server must not wait for it
	c.expectClosed()
}

func TestFastZero(t *testing.T) {
	dev := newTestDevice(1<<20, nil)
	slow := newTestDevice(1<<20, func(c *engine.Caps) { c.FastZero = false })
	// slow advertises no FAST_ZERO; a device that advertises it but refuses gives ENOTSUP.
	refuse := &notFastDevice{newTestDevice(1<<20, nil)}
	ts := startServer(t, Options{}, Export{Name: "fast", Device: dev}, Export{Name: "slow", Device: slow},
		Export{Name: "refuse", Device: refuse})
	c := openT(t, ts.sock, "fast", false, false)
	if r := c.do(cmdWriteZeroes, cflagFastZero|cflagNoHole, 0, 1<<20, nil); r.errno != 0 {
		t.Fatalf("fast zero: %v", r.errno)
	}
	c = openT(t, ts.sock, "slow", false, false)
	if c.tflags&tflagSendFastZero != 0 {
		t.Fatal("FAST_ZERO advertised without the capability")
	}
	if r := c.do(cmdWriteZeroes, cflagFastZero, 0, 4096, nil); r.errno != EINVAL {
		t.Fatalf("unadvertised fast zero: %v, want EINVAL", r.errno)
	}
	c = openT(t, ts.sock, "refuse", true, false)
	if r := c.do(cmdWriteZeroes, cflagFastZero, 0, 4096, nil); r.errno != ENOTSUP {
		t.Fatalf("refused fast zero: %v, want ENOTSUP", r.errno)
	}
	if r := c.do(cmdWriteZeroes, 0, 0, 4096, nil); r.errno != 0 {
		t.Fatalf("write zeroes without FAST_ZERO on the same device: %v", r.errno)
	}
}

type notFastDevice struct{ *testDevice }

func (d *notFastDevice) WriteZeroes(ctx context.Context, off, n int64, f engine.ZeroFlags) error {
	if f.FastZero {
		return engine.ErrNotFast
	}
	return d.testDevice.WriteZeroes(ctx, off, n, f)
}

// TestReadErrorNeverSendsData: a failed read is an error reply and no data, in both reply
// styles, and the stream stays in sync for the next request.
func TestReadErrorNeverSendsData(t *testing.T) {
	for _, structured := range []bool{false, true} {
		t.Run(fmt.Sprintf("structured=%v", structured), func(t *testing.T) {
			dev := newTestDevice(1<<20, nil)
			dev.failReads(8192, 4096)
			ts := startServer(t, Options{}, Export{Name: "d", Device: dev})
			c := openT(t, ts.sock, "d", structured, false)
			c.do(cmdWrite, 0, 0, 4, []byte("good"))
			r := c.do(cmdRead, 0, 4096, 8192, nil)
			if r.errno != EIO || r.data != nil {
				t.Fatalf("read of a tampered range: errno %v, %d data bytes", r.errno, len(r.data))
			}
			if structured && r.msg == "" {
				t.Fatal("structured error without a message")
			}
			if r := c.do(cmdCache, 0, 8192, 1, nil); r.errno != EIO {
				t.Fatalf("cache of a tampered range: %v", r.errno)
			}
			if r := c.do(cmdRead, 0, 0, 4, nil); r.errno != 0 || string(r.data) != "good" {
				t.Fatalf("read after the error: %+v", r)
			}
		})
	}
}

// TestBackpressure: with the in-flight bound reached, the reader stops admitting requests;
// all of them still complete.
func TestBackpressure(t *testing.T) {
	for _, tc := range []struct {
		name string
		opts Options
		n    uint32
	}{
		{"count", Options{MaxInFlight: 2}, 4096},
		{"bytes", Options{MaxInFlightBytes: 1 << 20}, 512 << 10},
	} {
		t.Run(tc.name, func(t *testing.T) {
			dev := newTestDevice(8<<20, func(c *engine.Caps) { c.MaxBlock = 1 << 20 })
			ts := startServer(t, tc.opts, Export{Name: "d", Device: dev})
			c := openT(t, ts.sock, "d", false, false)
			const reqs = 6
			var releases []func()
			for i := range reqs {
				releases = append(releases, dev.gate(int64(i)<<20))
			}
			for i := range reqs {
				c.send(cmdRead, 0, uint64(i), uint64(i)<<20, tc.n, nil)
			}
			got := 0
			for i := range reqs {
				<-dev.enterc // one more read reached the device
				if i >= 1 {
					releases[i-1]() // keep at most two blocked at once from our side
					if r := c.recv(); r.errno != 0 {
						t.Fatalf("read: %v", r.errno)
					}
					got++
				}
			}
			releases[reqs-1]()
			for ; got < reqs; got++ {
				c.recv()
			}
			if m := dev.maxActive.Load(); m != 2 {
				t.Fatalf("device saw %d concurrent reads, want exactly the bound 2", m)
			}
		})
	}
}

func TestPipelinedConcurrent(t *testing.T) {
	dev := newTestDevice(16<<20, nil)
	ts := startServer(t, Options{}, Export{Name: "d", Device: dev})
	c := openT(t, ts.sock, "d", true, false)
	const n = 64
	data := map[uint64][]byte{}
	for i := range uint64(n) {
		data[i] = pattern(16<<10, i)
		c.send(cmdWrite, 0, i, i*(64<<10), 16<<10, data[i])
	}
	for range n {
		if r := c.recv(); r.errno != 0 {
			t.Fatalf("write %d: %v", r.handle, r.errno)
		}
	}
	for i := range uint64(n) {
		c.send(cmdRead, 0, i, i*(64<<10), 16<<10, nil)
	}
	for range n {
		r := c.recv()
		if r.errno != 0 || !bytes.Equal(r.data, data[r.handle]) {
			t.Fatalf("read %d: errno %v", r.handle, r.errno)
		}
	}
}

// TestMalformedStreamClosesOnlyThatConnection: garbage on one connection ends it; another
// connection to the same export, with a request in flight, is unaffected.
func TestMalformedStreamClosesOnlyThatConnection(t *testing.T) {
	dev := newTestDevice(1<<20, nil)
	ts := startServer(t, Options{}, Export{Name: "d", Device: dev})
	good := openT(t, ts.sock, "d", true, false)
	bad := openT(t, ts.sock, "d", true, false)
	good.do(cmdWrite, 0, 0, 5, []byte("hello"))

	release := dev.gate(0)
	good.send(cmdRead, 0, 1, 0, 5, nil)
	<-dev.enterc
	bad.write([]byte("GET / HTTP/1.1\r\nHost: example.com\r\n\r\n"))
	bad.expectClosed()
	release()
	if r := good.recv(); r.errno != 0 || string(r.data) != "hello" {
		t.Fatalf("good connection: %+v", r)
	}
	if r := good.do(cmdRead, 0, 0, 5, nil); string(r.data) != "hello" {
		t.Fatal("good connection broken")
	}
	fresh := openT(t, ts.sock, "d", false, false)
	if r := fresh.do(cmdRead, 0, 0, 5, nil); string(r.data) != "hello" {
		t.Fatal("new connection broken")
	}
}

func TestDisconnect(t *testing.T) {
	dev := newTestDevice(1<<20, nil)
	ts := startServer(t, Options{}, Export{Name: "d", Device: dev})
	c := openT(t, ts.sock, "d", false, false)
	release := dev.gate(0)
	c.send(cmdRead, 0, 1, 0, 5, nil)
	<-dev.enterc
	c.send(cmdDisc, 0, 2, 0, 0, nil)
	release()
	// NBD_CMD_DISC: outstanding requests are answered first, then the server closes.
	if r := c.recv(); r.handle != 1 || r.errno != 0 {
		t.Fatalf("in-flight read after DISC: %+v", r)
	}
	c.expectClosed()
}

func TestShutdownFinishesInFlight(t *testing.T) {
	dev := newTestDevice(1<<20, nil)
	ts := startServer(t, Options{}, Export{Name: "d", Device: dev})
	c := openT(t, ts.sock, "d", false, false)
	idle := dialT(t, ts.sock) // still in the handshake
	idle.greet(flagCFixedNewstyle)
	c.do(cmdWrite, 0, 0, 5, []byte("hello"))
	release := dev.gate(0)
	c.send(cmdRead, 0, 1, 0, 5, nil)
	<-dev.enterc

	done := make(chan error, 1)
	go func() { done <- ts.Shutdown(context.Background()) }()
	idle.expectClosed()
	release()
	if r := c.recv(); r.errno != 0 || string(r.data) != "hello" {
		t.Fatalf("in-flight read during shutdown: %+v", r)
	}
	c.expectClosed()
	if err := <-done; err != nil {
		t.Fatalf("Shutdown: %v", err)
	}
	if dev.flushes.Load() == 0 {
		t.Fatal("Shutdown did not flush the device")
	}
	if err := <-ts.errc; !errors.Is(err, ErrServerClosed) {
		t.Fatalf("Serve: %v", err)
	}
	ts.errc <- ErrServerClosed
	if err := ts.Serve(context.Background(), nil); !errors.Is(err, ErrServerClosed) {
		t.Fatalf("Serve after Shutdown: %v", err)
	}
}

func TestShutdownDeadlineCancels(t *testing.T) {
	dev := newTestDevice(1<<20, nil)
	ts := startServer(t, Options{}, Export{Name: "d", Device: dev})
	c := openT(t, ts.sock, "d", false, false)
	release := dev.gate(0)
	defer release()
	c.send(cmdRead, 0, 1, 0, 5, nil)
	<-dev.enterc
	ctx, cancel := context.WithCancel(context.Background())
	cancel() // already expired: the blocked read is cancelled, the connection closed hard
	if err := ts.Shutdown(ctx); !errors.Is(err, context.Canceled) {
		t.Fatalf("Shutdown with an expired context: %v", err)
	}
	c.expectClosed()
}

func TestRemoveExport(t *testing.T) {
	a, b := newTestDevice(1<<20, nil), newTestDevice(1<<20, nil)
	ts := startServer(t, Options{}, Export{Name: "a", Device: a}, Export{Name: "b", Device: b})
	ca := openT(t, ts.sock, "a", false, false)
	cb := openT(t, ts.sock, "b", false, false)
	ca.do(cmdWrite, 0, 0, 1, []byte{1})
	if err := ts.RemoveExport(context.Background(), "a"); err != nil {
		t.Fatal(err)
	}
	ca.expectClosed()
	if a.flushes.Load() == 0 {
		t.Fatal("RemoveExport did not flush")
	}
	if r := cb.do(cmdRead, 0, 0, 1, nil); r.errno != 0 {
		t.Fatalf("other export broken: %v", r.errno)
	}
	c := dialT(t, ts.sock)
	c.greet(flagCFixedNewstyle)
	c.expectOpt(optInfo, infoPayload("a"), repErrUnknown)
	if err := ts.RemoveExport(context.Background(), "a"); !errors.Is(err, ErrUnknownExport) {
		t.Fatalf("second remove: %v", err)
	}
	if err := ts.AddExport(Export{Name: "a", Device: a}); err != nil {
		t.Fatal(err)
	}
	c.expectOpt(optGo, infoPayload("a"), repAck)
	if r := c.do(cmdRead, 0, 0, 1, nil); r.errno != 0 || r.data[0] != 1 {
		t.Fatalf("re-added export: %+v", r)
	}
}

func TestErrnoFor(t *testing.T) {
	wrap := func(err error) error { return fmt.Errorf("failed to frob: %w", err) }
	for _, tc := range []struct {
		cmd, flags uint16
		err        error
		want       Errno
	}{
		{cmdRead, 0, nil, 0},
		{cmdRead, 0, wrap(engine.ErrOutOfRange), EINVAL},
		{cmdTrim, 0, wrap(engine.ErrOutOfRange), EINVAL},
		{cmdBlockStatus, 0, wrap(engine.ErrOutOfRange), EINVAL},
		{cmdWrite, 0, wrap(engine.ErrOutOfRange), ENOSPC},
		{cmdWriteZeroes, 0, wrap(engine.ErrOutOfRange), ENOSPC},
		{cmdRead, 0, wrap(engine.ErrTooLarge), EINVAL},
		{cmdWrite, 0, wrap(engine.ErrReadOnly), EPERM},
		{cmdRead, 0, wrap(engine.ErrPermission), EPERM},
		{cmdRead, 0, wrap(engine.ErrIntegrity), EIO},
		{cmdWriteZeroes, cflagFastZero, wrap(engine.ErrNotFast), ENOTSUP},
		{cmdWriteZeroes, 0, wrap(engine.ErrNotFast), EIO},
		{cmdRead, 0, wrap(engine.ErrDetached), ESHUTDOWN},
		{cmdRead, 0, context.Canceled, ESHUTDOWN},
		{cmdWrite, 0, wrap(syscall.ENOSPC), ENOSPC},
		{cmdWrite, 0, wrap(syscall.EDQUOT), ENOSPC},
		{cmdRead, 0, errors.New("disk on fire"), EIO},
	} {
		if got := errnoFor(tc.cmd, tc.flags, tc.err); got != tc.want {
			t.Errorf("errnoFor(%s, %#x, %v) = %v, want %v", cmdName(tc.cmd), tc.flags, tc.err, got, tc.want)
		}
	}
}

func TestDescriptors(t *testing.T) {
	H, Z := stateHole, stateZero
	e := func(n int64, hole, zero bool) engine.Extent { return engine.Extent{Length: n, Hole: hole, Zero: zero} }
	for _, tc := range []struct {
		name   string
		exts   []engine.Extent
		n, mb  int64
		reqOne bool
		want   string
	}{
		{"merge equal", []engine.Extent{e(10, true, true), e(5, true, true), e(3, false, false)}, 20, 1, false,
			fmt.Sprint([]desc{{15, H | Z}, {3, 0}})},
		{"req one", []engine.Extent{e(10, true, true), e(3, false, false)}, 20, 1, true, fmt.Sprint([]desc{{10, H | Z}})},
		{"straddling block gets shared flags", []engine.Extent{e(768, true, true), e(256, false, true), e(1024, false, false)}, 2048, 512, false,
			fmt.Sprint([]desc{{512, H | Z}, {512, Z}, {1024, 0}})},
		{"short tail block is unknown", []engine.Extent{e(1024, true, true), e(100, true, true)}, 2048, 512, false,
			fmt.Sprint([]desc{{1024, H | Z}, {512, 0}})},
		{"tiny first extent", []engine.Extent{e(1, false, false)}, 512, 512, false, fmt.Sprint([]desc{{512, 0}})},
	} {
		got, err := descriptors(tc.exts, tc.n, tc.mb, tc.reqOne)
		if err != nil || fmt.Sprint(got) != tc.want {
			t.Errorf("%s: got %v (%v), want %s", tc.name, got, err, tc.want)
		}
	}
	for _, bad := range [][]engine.Extent{nil, {e(0, false, false)}, {e(30, false, false)}} {
		if _, err := descriptors(bad, 20, 1, false); err == nil {
			t.Errorf("descriptors(%v) accepted a broken device answer", bad)
		}
	}
}

func TestHandshakeTimeout(t *testing.T) {
	ts := startServer(t, Options{HandshakeTimeout: 50 * time.Millisecond}, twoExports()...)
	c := dialT(t, ts.sock)
	c.greet(flagCFixedNewstyle) // then say nothing
	c.expectClosed()
}
