package nbd

import (
	"bufio"
	"context"
	"errors"
	"io"
	"log/slog"
	"net"
	"sync"
	"sync/atomic"
	"time"
)

// conn is one client connection: option haggling, then transmission.
//
// Transmission (transmit.go) is built for a low cost per request. The reader (serve's
// goroutine, or the one it handed reading to, rescue.go) parses and validates requests from
// a buffered reader and reads write payloads into pooled buffers; an admitted request runs on
// a pooled worker goroutine, or on the reader itself for a READ with nothing else executing. At most MaxInFlight requests
// holding at most the byte budget are admitted; when either is spent the reader stops
// reading, so a client that floods requests is slowed by its socket, not by server memory.
// Finished requests queue their replies; whoever finds no writer active becomes the writer
// and sends everything queued in one writev (reply.go), so replies completed together cost
// one syscall and no goroutine is woken to write.
type conn struct {
	s    *Server
	raw  net.Conn
	log  *slog.Logger
	done chan struct{} // closed when serve has returned

	// ctx is the context of device calls: cancelled only by kill (Shutdown or RemoveExport
	// deadline, or the Serve context), never by an ordinary disconnect.
	ctx    context.Context
	cancel context.CancelFunc

	mu           sync.Mutex // guards nc, exp, transmitting, stopping and the closing of stop
	nc           net.Conn   // raw, or the TLS connection after STARTTLS
	exp          *export    // set when the client enters transmission
	transmitting bool
	stopping     bool
	stop         chan struct{} // closed by drain/kill: start no further request

	// Handshake state and the reader's buffer: owned by the serve goroutine, in transmission
	// by the reader.
	br         *bufio.Reader
	fixed      bool // client set NBD_FLAG_C_FIXED_NEWSTYLE
	noZeroes   bool
	tlsUp      bool
	identity   string // from the verified client certificate; "" without one
	structured bool
	metaExport string // export the last SET_META_CONTEXT selected base:allocation for
	metaOK     bool
	size       uint64 // export size, fixed at transmission start
	tflags     uint16 // transmission flags sent to the client
	meta       bool   // base:allocation usable in transmission

	// bw buffers the handshake, and in transmission the replies of connections without
	// writev (TLS); only the current writer touches it then (see queueReply).
	bw *bufio.Writer

	// Transmission. The reader admits requests against budget and runs each one on a pooled
	// worker (work); replies go through queueReply.
	budget    budget
	inflight  sync.WaitGroup // admitted requests whose reply is not yet written or dropped
	work      chan *job      // idle workers wait here; closed when transmission ends
	workers   sync.WaitGroup
	handed    atomic.Int64 // requests handed to workers (inline reads are not)
	executing atomic.Int32 // jobs executing (on workers or inline) and not yet queued for reply

	// The reader's role (rescue.go): tx is the export of transmission; inlineSince is the
	// start time of the request the reader runs inline, 0 when none; the goroutine that ends
	// reading after a hand-over sends on readEnd.
	tx          *export
	inlineSince atomic.Int64
	readEnd     chan bool

	wmu     sync.Mutex // guards queue, spare and writing
	queue   []*job     // replies waiting for the writer
	spare   []*job     // the previous batch's slice, reused
	writing bool       // someone is in the writer loop

	// Owned by the goroutine in the writer loop (writing == true).
	wconn net.Conn    // the transmission connection (raw or TLS)
	vec   bool        // wconn takes writev: replies go out unbuffered
	iov   net.Buffers // the batch being written (vec)
	iovs  [][]byte    // iov's backing array, reused
	werr  error       // first write error; later replies are dropped
}

// connIDs numbers connections for logs (Unix-socket peers have no address to show).
var connIDs atomic.Uint64

func newConn(s *Server, nc net.Conn) *conn {
	remote := ""
	if a := nc.RemoteAddr(); a != nil {
		remote = a.String()
	}
	c := &conn{
		s:    s,
		raw:  nc,
		nc:   nc,
		log:  s.log.With("conn", connIDs.Add(1), "remote", remote),
		done: make(chan struct{}),
		stop: make(chan struct{}),
		br:   bufio.NewReaderSize(nc, 64<<10),
		bw:   bufio.NewWriterSize(nc, 64<<10),
	}
	c.ctx, c.cancel = context.WithCancel(s.forceCtx)
	return c
}

func (c *conn) export() *export {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.exp
}

// drain asks the connection to end gracefully: in handshake it is closed at once; in
// transmission the reader is woken (read deadline) and stops, in-flight requests finish
// and get their replies, then the connection closes.
func (c *conn) drain() {
	c.mu.Lock()
	defer c.mu.Unlock()
	if !c.stopping {
		c.stopping = true
		close(c.stop)
	}
	if c.transmitting {
		c.nc.SetReadDeadline(time.Now())
	} else {
		c.raw.Close()
	}
}

// kill ends the connection hard and cancels its device calls.
func (c *conn) kill() {
	c.mu.Lock()
	defer c.mu.Unlock()
	if !c.stopping {
		c.stopping = true
		close(c.stop)
	}
	c.cancel()
	c.raw.Close()
}

func (c *conn) isStopping() bool {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.stopping
}

// closeNC closes the connection gracefully (TLS: close_notify first). It may block on a
// peer that does not read (crypto/tls bounds that), so it runs outside c.mu.
func (c *conn) closeNC() {
	c.mu.Lock()
	nc := c.nc
	c.mu.Unlock()
	nc.Close()
}

// serve runs the connection to its end. serveCtx is Serve's context: its end kills the
// connection.
func (c *conn) serve(serveCtx context.Context) {
	defer close(c.done)
	defer c.cancel()
	unhook := context.AfterFunc(serveCtx, c.kill)
	defer unhook()

	x, err := c.handshake()
	if err != nil {
		if !errors.Is(err, errAbort) && !c.isStopping() {
			c.log.Debug("nbd handshake ended", "err", err)
		}
		c.closeNC()
		return
	}
	c.log = c.log.With("export", x.Name)
	c.s.metrics.Connections(x.Name, 1)
	defer c.s.metrics.Connections(x.Name, -1)
	c.transmit(x)
}

// budget bounds what one connection has in flight: a request count and buffer bytes.
// Only the reader acquires; the writer releases once a reply is written, so replies waiting
// on a slow client count too.
type budget struct {
	mu       sync.Mutex // guards n, bytes, waiting
	n, maxN  int
	bytes    int64
	maxBytes int64
	waiting  bool          // the reader waits on wake
	wake     chan struct{} // one token: a release happened while the reader waited
}

func (b *budget) init(maxN int, maxBytes int64) {
	b.maxN, b.maxBytes = maxN, maxBytes
	b.wake = make(chan struct{}, 1)
}

// acquire takes one request slot and cost bytes, waiting for releases; false when stop
// closes first. A cost above the whole budget is admitted alone.
func (b *budget) acquire(stop <-chan struct{}, cost int64) bool {
	for {
		b.mu.Lock()
		if b.n < b.maxN && (b.bytes+cost <= b.maxBytes || b.bytes == 0) {
			b.n++
			b.bytes += cost
			b.waiting = false
			b.mu.Unlock()
			return true
		}
		b.waiting = true
		b.mu.Unlock()
		select {
		case <-b.wake:
		case <-stop:
			return false
		}
	}
}

func (b *budget) release(cost int64) {
	b.mu.Lock()
	b.n--
	b.bytes -= cost
	if b.n < 0 || b.bytes < 0 {
		panic("BUG: nbd: budget released more than acquired")
	}
	if b.waiting {
		b.waiting = false
		select {
		case b.wake <- struct{}{}:
		default: // a token is already there
		}
	}
	b.mu.Unlock()
}

// Buffer pool: power-of-two classes from 4 KiB to maxAdvertisedBlock, so a stream of
// requests reuses buffers instead of allocating each payload.
const (
	minBufShift = 12
	maxBufShift = 26
)

var bufPools [maxBufShift - minBufShift + 1]sync.Pool

func bufClass(n int) int {
	c := 0
	for (1 << (minBufShift + c)) < n {
		c++
	}
	return c
}

// getBuf returns a pooled buffer of n bytes. The pool holds *[]byte (a slice in an
// interface would cost an allocation per Put); the caller keeps the pointer for putBuf.
func getBuf(n int) *[]byte {
	if n > 1<<maxBufShift {
		panic("BUG: nbd: buffer above the advertised maximum block")
	}
	c := bufClass(n)
	if p, ok := bufPools[c].Get().(*[]byte); ok {
		*p = (*p)[:n]
		return p
	}
	b := make([]byte, n, 1<<(minBufShift+c))
	return &b
}

func putBuf(p *[]byte) {
	c := bufClass(cap(*p))
	if cap(*p) != 1<<(minBufShift+c) {
		panic("BUG: nbd: foreign buffer returned to the pool")
	}
	*p = (*p)[:cap(*p)]
	bufPools[c].Put(p)
}

// discard reads and drops n bytes of payload without buffering them.
func discard(r io.Reader, n int64) error {
	_, err := io.CopyN(io.Discard, r, n)
	return err
}
