package nbd

import (
	"sync"
	"sync/atomic"
	"time"
)

// A connection's reader runs a READ itself (inline) when nothing else of the connection is
// executing and no further request is buffered: the client waits for this reply, so handing
// the request to a worker would only add two goroutine wake-ups to its latency and CPU (at
// queue depth 1 they were most of both). But a device call can block (a cold disk, a slow
// store, a read waiting behind the shard's write-back), and requests sent meanwhile must
// still be read and answered out of order. So one watch goroutine per server looks, every
// rescueTick while inline requests are being run, at each transmitting connection: a reader
// that has been inside one request for rescueAfter or more loses the reader's role to a new
// goroutine, which goes on reading; the old one finishes its request like a worker.
//
// The watch costs a wake-up per tick, not per request, and it parks after rescueIdle ticks
// without an inline request, and ends when no connection is transmitting: an idle server
// runs no timer.
const (
	rescueTick  = time.Millisecond
	rescueAfter = time.Millisecond
	rescueIdle  = 100
)

// epoch is the origin of inline start times (monotonic clock).
var epoch = time.Now()

func monotonic() int64 { return int64(time.Since(epoch)) }

type rescuer struct {
	mu      sync.Mutex         // guards conns and running
	conns   map[*conn]struct{} // transmitting connections
	running bool               // the watch goroutine exists

	starts atomic.Uint64 // inline requests begun, server-wide: the watch's sign of activity
	parked atomic.Bool   // the watch waits on wake
	wake   chan struct{} // one token, sent by whoever clears parked
}

func newRescuer() *rescuer {
	return &rescuer{conns: make(map[*conn]struct{}), wake: make(chan struct{}, 1)}
}

// add registers a connection entering transmission, starting the watch if needed.
func (r *rescuer) add(c *conn) {
	r.mu.Lock()
	defer r.mu.Unlock()
	r.conns[c] = struct{}{}
	if !r.running {
		r.running = true
		go r.watch()
	}
}

// remove unregisters a connection whose reading has ended; the watch ends with the last.
func (r *rescuer) remove(c *conn) {
	r.mu.Lock()
	delete(r.conns, c)
	last := len(r.conns) == 0
	r.mu.Unlock()
	if last {
		r.unpark()
	}
}

// started records an inline request's start and wakes a parked watch.
func (r *rescuer) started() {
	r.starts.Add(1)
	r.unpark()
}

func (r *rescuer) unpark() {
	if r.parked.Load() && r.parked.CompareAndSwap(true, false) {
		r.wake <- struct{}{}
	}
}

func (r *rescuer) watch() {
	t := time.NewTicker(rescueTick)
	defer t.Stop()
	last, idle := r.starts.Load(), 0
	for {
		<-t.C
		r.mu.Lock()
		if len(r.conns) == 0 {
			r.running = false
			r.mu.Unlock()
			return
		}
		now := monotonic()
		for c := range r.conns {
			c.rescueIfStuck(now)
		}
		r.mu.Unlock()

		if n := r.starts.Load(); n != last {
			last, idle = n, 0
			continue
		}
		if idle++; idle < rescueIdle {
			continue
		}
		// Park. A start (or the last remove) after the Store sees parked and sends the
		// token; one before it shows in starts, and then whoever clears parked first wins:
		// if the starter did, its token is already on its way.
		t.Stop()
		r.parked.Store(true)
		if r.starts.Load() == last || !r.parked.CompareAndSwap(true, false) {
			<-r.wake
		}
		last, idle = r.starts.Load(), 0
		t.Reset(rescueTick)
	}
}

// rescueIfStuck hands c's reading to a new goroutine if its reader has been running one
// request inline since before now-rescueAfter. The reader finds its start time gone when it
// finishes, and leaves reading to the new one.
func (c *conn) rescueIfStuck(now int64) {
	since := c.inlineSince.Load()
	if since == 0 || now-since < int64(rescueAfter) || !c.inlineSince.CompareAndSwap(since, 0) {
		return
	}
	c.log.Debug("nbd read still running on the reader; reading goes on in a new goroutine", "since", time.Duration(now-since))
	c.workers.Add(1)
	go func() {
		defer c.workers.Done()
		if hard, ok := c.read(); ok {
			c.readEnd <- hard
		}
	}()
}

// runInline runs j on the reader and replies. It returns false if the reader's role was
// taken meanwhile (rescueIfStuck): the caller must not read again.
func (c *conn) runInline(j *job) bool {
	since := max(monotonic(), 1) // 0 is "none"; the CAS on it is the hand-over, so equal times do no harm
	c.inlineSince.Store(since)
	c.s.rescue.started()
	c.executing.Add(1)
	c.execute(j)
	kept := c.inlineSince.CompareAndSwap(since, 0)
	c.queueReply(j, true)
	return kept
}
