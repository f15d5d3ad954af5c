package nbd

import (
	"bufio"
	"context"
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net"
	"os"
	"path/filepath"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/sealdisk/sealdisk/engine"
)

// testDevice wraps a MemDevice to override Caps, block chosen reads until the test releases
// them (forcing out-of-order completion without timing), and inject read errors.
type testDevice struct {
	*engine.MemDevice
	caps engine.Caps

	mu     sync.Mutex                    // guards gates, bad
	gates  map[int64]chan struct{}       // a read at this offset waits for the channel to close
	bad    [][2]int64                    // read ranges that fail with ErrIntegrity
	enterc chan int64                    // gated reads announce their offset here
	delay  func(off int64) time.Duration // optional: slows chosen reads

	active, maxActive atomic.Int64
	flushes           atomic.Int64
	fuaTrims, fuaZero atomic.Int64 // trims and write-zeroes that asked for FUA
	zeroCalls         atomic.Int64
}

func newTestDevice(size int64, mod func(*engine.Caps)) *testDevice {
	m := engine.NewMemDevice(size, false)
	d := &testDevice{MemDevice: m, caps: m.Caps(), gates: map[int64]chan struct{}{}, enterc: make(chan int64, 256)}
	if mod != nil {
		mod(&d.caps)
	}
	return d
}

func (d *testDevice) Caps() engine.Caps { return d.caps }

// gate makes reads at off block until the returned func is called.
func (d *testDevice) gate(off int64) (release func()) {
	ch := make(chan struct{})
	d.mu.Lock()
	d.gates[off] = ch
	d.mu.Unlock()
	var once sync.Once
	return func() { once.Do(func() { close(ch) }) }
}

func (d *testDevice) failReads(off, n int64) {
	d.mu.Lock()
	d.bad = append(d.bad, [2]int64{off, n})
	d.mu.Unlock()
}

func (d *testDevice) ReadAt(ctx context.Context, p []byte, off int64) error {
	n := d.active.Add(1)
	defer d.active.Add(-1)
	for {
		m := d.maxActive.Load()
		if n <= m || d.maxActive.CompareAndSwap(m, n) {
			break
		}
	}
	d.mu.Lock()
	g := d.gates[off]
	var bad bool
	for _, b := range d.bad {
		if off < b[0]+b[1] && b[0] < off+int64(len(p)) {
			bad = true
		}
	}
	d.mu.Unlock()
	if g != nil {
		d.enterc <- off
		select {
		case <-g:
		case <-ctx.Done():
			return ctx.Err()
		}
	}
	if d.delay != nil {
		time.Sleep(d.delay(off))
	}
	if bad {
		return fmt.Errorf("sector at %d: %w", off, engine.ErrIntegrity)
	}
	return d.MemDevice.ReadAt(ctx, p, off)
}

func (d *testDevice) WriteAt(ctx context.Context, p []byte, off int64, fua bool) error {
	if d.caps.ReadOnly {
		return engine.ErrReadOnly
	}
	return d.MemDevice.WriteAt(ctx, p, off, fua)
}

func (d *testDevice) WriteZeroes(ctx context.Context, off, n int64, f engine.ZeroFlags) error {
	d.zeroCalls.Add(1)
	if f.FUA {
		d.fuaZero.Add(1)
	}
	if f.FastZero && !d.caps.FastZero {
		return engine.ErrNotFast
	}
	return d.MemDevice.WriteZeroes(ctx, off, n, f)
}

func (d *testDevice) Trim(ctx context.Context, off, n int64, fua bool) error {
	if fua {
		d.fuaTrims.Add(1)
	}
	return d.MemDevice.Trim(ctx, off, n, fua)
}

func (d *testDevice) Flush(ctx context.Context) error {
	d.flushes.Add(1)
	return d.MemDevice.Flush(ctx)
}

// shortDir is a temporary directory with a path short enough for a Unix socket.
func shortDir(t testing.TB) string {
	dir, err := os.MkdirTemp("", "nbdt")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { os.RemoveAll(dir) })
	return dir
}

type testServer struct {
	*Server
	sock string
	errc chan error
}

func quietLogger() *slog.Logger {
	if os.Getenv("NBD_TEST_LOG") != "" {
		return slog.New(slog.NewTextHandler(os.Stderr, &slog.HandlerOptions{Level: slog.LevelDebug}))
	}
	return slog.New(slog.DiscardHandler)
}

// startServer serves exports on a Unix socket; cleanup shuts it down.
func startServer(t testing.TB, opts Options, exports ...Export) *testServer {
	t.Helper()
	if opts.Logger == nil {
		opts.Logger = quietLogger()
	}
	s := NewServer(opts)
	for _, e := range exports {
		if err := s.AddExport(e); err != nil {
			t.Fatal(err)
		}
	}
	sock := filepath.Join(shortDir(t), "s")
	ln, err := ListenUnix(sock, 0)
	if err != nil {
		t.Fatal(err)
	}
	ts := &testServer{Server: s, sock: sock, errc: make(chan error, 1)}
	go func() { ts.errc <- s.Serve(context.Background(), ln) }()
	t.Cleanup(func() { ts.stop(t) })
	return ts
}

func (ts *testServer) stop(t testing.TB) {
	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
	defer cancel()
	if err := ts.Shutdown(ctx); err != nil {
		t.Errorf("shutdown: %v", err)
	}
	ctx, cancel = context.WithTimeout(context.Background(), 20*time.Second)
	defer cancel()
	select {
	case err := <-ts.errc:
		if !errors.Is(err, ErrServerClosed) {
			t.Errorf("Serve returned %v, want ErrServerClosed", err)
		}
		ts.errc <- err // later calls see it too
	case <-ctx.Done():
		t.Error("Serve did not return after Shutdown")
	}
}

// tclient is a minimal raw NBD client for protocol tests: it sends exactly the bytes a
// test asks for and decodes replies strictly.
type tclient struct {
	t          testing.TB
	c          net.Conn
	br         *bufio.Reader
	structured bool
	size       uint64
	tflags     uint16
	pending    map[uint64]request // sent, not yet answered
}

func dialT(t testing.TB, sock string) *tclient {
	t.Helper()
	c, err := net.Dial("unix", sock)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { c.Close() })
	return newTClient(t, c)
}

func newTClient(t testing.TB, c net.Conn) *tclient {
	return &tclient{t: t, c: c, br: bufio.NewReader(c), pending: map[uint64]request{}}
}

func (c *tclient) write(b []byte) {
	c.t.Helper()
	if _, err := c.c.Write(b); err != nil {
		c.t.Fatalf("client write: %v", err)
	}
}

func (c *tclient) read(n int) []byte {
	c.t.Helper()
	b := make([]byte, n)
	if _, err := io.ReadFull(c.br, b); err != nil {
		c.t.Fatalf("client read %d bytes: %v", n, err)
	}
	return b
}

// greet reads the server greeting and sends client flags.
func (c *tclient) greet(flags uint32) {
	c.t.Helper()
	h := c.read(18)
	if binary.BigEndian.Uint64(h) != magicNBD || binary.BigEndian.Uint64(h[8:]) != magicOpt {
		c.t.Fatalf("bad greeting % x", h)
	}
	if f := binary.BigEndian.Uint16(h[16:]); f != flagFixedNewstyle|flagNoZeroes {
		c.t.Fatalf("handshake flags %#x", f)
	}
	c.write(binary.BigEndian.AppendUint32(nil, flags))
}

func (c *tclient) sendOpt(opt uint32, data []byte) {
	c.t.Helper()
	b := binary.BigEndian.AppendUint64(nil, magicOpt)
	b = binary.BigEndian.AppendUint32(b, opt)
	b = binary.BigEndian.AppendUint32(b, uint32(len(data)))
	c.write(append(b, data...))
}

type optReply struct {
	opt, typ uint32
	data     []byte
}

func (c *tclient) optReply() optReply {
	c.t.Helper()
	h := c.read(20)
	if binary.BigEndian.Uint64(h) != magicOptReply {
		c.t.Fatalf("bad option reply magic % x", h)
	}
	r := optReply{opt: binary.BigEndian.Uint32(h[8:]), typ: binary.BigEndian.Uint32(h[12:])}
	r.data = c.read(int(binary.BigEndian.Uint32(h[16:])))
	return r
}

// optReplies reads replies to opt until a final one (ACK or error).
func (c *tclient) optReplies(opt uint32) (inter []optReply, final optReply) {
	c.t.Helper()
	for {
		r := c.optReply()
		if r.opt != opt {
			c.t.Fatalf("reply for option %d, want %d", r.opt, opt)
		}
		if r.typ == repAck || r.typ&(1<<31) != 0 {
			return inter, r
		}
		inter = append(inter, r)
	}
}

func infoPayload(name string, reqs ...uint16) []byte {
	b := binary.BigEndian.AppendUint32(nil, uint32(len(name)))
	b = append(b, name...)
	b = binary.BigEndian.AppendUint16(b, uint16(len(reqs)))
	for _, r := range reqs {
		b = binary.BigEndian.AppendUint16(b, r)
	}
	return b
}

func metaPayload(name string, queries ...string) []byte {
	b := binary.BigEndian.AppendUint32(nil, uint32(len(name)))
	b = append(b, name...)
	b = binary.BigEndian.AppendUint32(b, uint32(len(queries)))
	for _, q := range queries {
		b = binary.BigEndian.AppendUint32(b, uint32(len(q)))
		b = append(b, q...)
	}
	return b
}

// expectOpt sends an option and checks the final reply type.
func (c *tclient) expectOpt(opt uint32, data []byte, want uint32) []optReply {
	c.t.Helper()
	c.sendOpt(opt, data)
	inter, final := c.optReplies(opt)
	if final.typ != want {
		c.t.Fatalf("option %s: final reply %#x (%q), want %#x", optName(opt), final.typ, final.data, want)
	}
	return inter
}

// open negotiates and enters transmission with NBD_OPT_GO.
func (c *tclient) open(name string, structured, meta bool) {
	c.t.Helper()
	c.greet(flagCFixedNewstyle | flagCNoZeroes)
	if structured {
		c.expectOpt(optStructuredReply, nil, repAck)
		c.structured = true
	}
	if meta {
		c.expectOpt(optSetMetaContext, metaPayload(name, metaBaseAllocation), repAck)
	}
	inter := c.expectOpt(optGo, infoPayload(name, infoBlockSize), repAck)
	for _, r := range inter {
		if binary.BigEndian.Uint16(r.data) == infoExport {
			c.size = binary.BigEndian.Uint64(r.data[2:])
			c.tflags = binary.BigEndian.Uint16(r.data[10:])
		}
	}
}

// openT dials and opens in one step.
func openT(t testing.TB, sock, name string, structured, meta bool) *tclient {
	t.Helper()
	c := dialT(t, sock)
	c.open(name, structured, meta)
	return c
}

func (c *tclient) send(cmd, flags uint16, handle, off uint64, length uint32, payload []byte) {
	c.t.Helper()
	b := binary.BigEndian.AppendUint32(make([]byte, 0, 28+len(payload)), magicRequest)
	b = binary.BigEndian.AppendUint16(b, flags)
	b = binary.BigEndian.AppendUint16(b, cmd)
	b = binary.BigEndian.AppendUint64(b, handle)
	b = binary.BigEndian.AppendUint64(b, off)
	b = binary.BigEndian.AppendUint32(b, length)
	c.pending[handle] = request{flags: flags, cmd: cmd, handle: handle, offset: off, length: length}
	c.write(append(b, payload...))
}

type treply struct {
	handle     uint64
	errno      Errno
	msg        string
	data       []byte // read data, assembled
	descs      []desc
	structured bool
	chunks     int
}

// recv reads one complete reply (all chunks of one handle when structured).
func (c *tclient) recv() treply {
	c.t.Helper()
	partial := map[uint64]*treply{}
	for {
		magic := binary.BigEndian.Uint32(c.read(4))
		switch magic {
		case magicSimpleReply:
			h := c.read(12)
			r := treply{errno: Errno(binary.BigEndian.Uint32(h)), handle: binary.BigEndian.Uint64(h[4:])}
			req, ok := c.pending[r.handle]
			if !ok {
				c.t.Fatalf("simple reply for unknown handle %d", r.handle)
			}
			delete(c.pending, r.handle)
			if req.cmd == cmdRead && c.structured {
				c.t.Fatalf("simple reply to a read after structured replies were negotiated")
			}
			if req.cmd == cmdRead && r.errno == 0 {
				r.data = c.read(int(req.length))
			}
			return r
		case magicStructReply:
			h := c.read(16)
			flags, typ := binary.BigEndian.Uint16(h), binary.BigEndian.Uint16(h[2:])
			handle := binary.BigEndian.Uint64(h[4:])
			p := c.read(int(binary.BigEndian.Uint32(h[12:])))
			req, ok := c.pending[handle]
			if !ok {
				c.t.Fatalf("structured reply for unknown handle %d", handle)
			}
			r := partial[handle]
			if r == nil {
				r = &treply{handle: handle, structured: true}
				if req.cmd == cmdRead {
					r.data = make([]byte, req.length)
				}
				partial[handle] = r
			}
			r.chunks++
			switch typ {
			case replyTypeNone:
			case replyTypeOffsetData:
				off := binary.BigEndian.Uint64(p) - req.offset
				copy(r.data[off:], p[8:])
			case replyTypeBlockStatus:
				if id := binary.BigEndian.Uint32(p); id != metaContextID {
					c.t.Fatalf("block status for context %d", id)
				}
				for q := p[4:]; len(q) >= 8; q = q[8:] {
					r.descs = append(r.descs, desc{binary.BigEndian.Uint32(q), binary.BigEndian.Uint32(q[4:])})
				}
			case replyTypeError:
				r.errno = Errno(binary.BigEndian.Uint32(p))
				r.msg = string(p[6 : 6+binary.BigEndian.Uint16(p[4:])])
				r.data = nil
			default:
				c.t.Fatalf("unexpected chunk type %#x", typ)
			}
			if flags&replyFlagDone != 0 {
				delete(c.pending, handle)
				return *r
			}
		default:
			c.t.Fatalf("bad reply magic %#x", magic)
		}
	}
}

// do sends one request and waits for its reply.
func (c *tclient) do(cmd, flags uint16, off uint64, length uint32, payload []byte) treply {
	c.t.Helper()
	c.send(cmd, flags, 7, off, length, payload)
	r := c.recv()
	if r.handle != 7 {
		c.t.Fatalf("reply for handle %d", r.handle)
	}
	return r
}

// expectClosed checks the server closed the connection.
func (c *tclient) expectClosed() {
	c.t.Helper()
	c.c.SetReadDeadline(time.Now().Add(10 * time.Second))
	// EOF or a reset (the server closed with our bytes unread) both mean closed.
	if _, err := io.Copy(io.Discard, c.br); err != nil {
		var ne net.Error
		if errors.As(err, &ne) && ne.Timeout() {
			c.t.Fatalf("server did not close the connection")
		}
	}
}
