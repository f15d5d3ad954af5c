package nbd

import (
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net"
	"time"

	"github.com/sealdisk/sealdisk/engine"
)

const (
	// maxWriteDiscard: a WRITE refused before its payload is read (too large, out of range,
	// bad flags...) has its payload skipped up to this size, keeping the connection; a
	// larger one is a denial of service and ends the connection. The spec says payloads
	// under 32 MiB must never be treated so.
	maxWriteDiscard = 2 * maxAdvertisedBlock
	// maxDescriptors caps one block-status reply (the spec allows returning fewer).
	maxDescriptors = 1 << 14
)

// transmit runs the transmission phase until the client disconnects, breaks the protocol,
// or the connection is drained.
func (c *conn) transmit(x *export) {
	c.budget.init(c.s.opts.MaxInFlight, max(c.s.opts.MaxInFlightBytes, int64(x.maxBlock)))
	c.mu.Lock()
	c.wconn = c.nc
	c.mu.Unlock()
	c.vec = canWritev(c.wconn)
	c.work = make(chan *job)
	c.tx, c.readEnd = x, make(chan bool, 1)
	c.s.rescue.add(c)
	hard := c.readRequests()
	c.s.rescue.remove(c)
	if hard {
		// Protocol violation: hard disconnect, then let workers run out (their replies fail).
		c.raw.Close()
	}
	c.inflight.Wait() // every admitted request answered (or dropped after a write error)
	close(c.work)
	c.workers.Wait()
	if !hard {
		c.closeNC() // tls.Conn.Close sends close_notify first
	}
}

// readRequests reads requests until the connection's transmission ends. It returns true
// when the connection must end hard. The reader's role may pass to other goroutines
// (rescue.go); the last one's result is returned.
func (c *conn) readRequests() (hard bool) {
	if hard, ok := c.read(); ok {
		return hard
	}
	return <-c.readEnd
}

// read is the reader loop over the export of transmission. ok is false when the reader's role
// passed to another goroutine while this one ran a request inline; else reading has ended and
// hard says how.
func (c *conn) read() (hard, ok bool) {
	x := c.tx
	var hdr [requestHeaderSize]byte
	for {
		select {
		case <-c.stop:
			return false, true
		default:
		}
		if _, err := io.ReadFull(c.br, hdr[:]); err != nil {
			if !c.isStopping() && !errors.Is(err, io.EOF) && !errors.Is(err, net.ErrClosed) {
				c.log.Debug("nbd connection read failed", "err", err)
			}
			return false, true
		}
		magic, r := parseRequest(&hdr)
		if magic != magicRequest {
			c.log.Warn("nbd protocol violation: bad request magic; closing connection", "magic", fmt.Sprintf("%#x", magic))
			return true, true
		}
		if r.cmd == cmdDisc {
			return false, true
		}
		if errno, msg := c.validate(x, &r); errno != 0 {
			if r.cmd == cmdWrite {
				if r.length > maxWriteDiscard {
					c.log.Warn("nbd write payload too large to skip; closing connection", "length", r.length)
					return true, true
				}
				if err := discard(c.br, int64(r.length)); err != nil {
					return false, true
				}
			}
			c.log.Debug("nbd request refused", "cmd", cmdName(r.cmd), "offset", r.offset, "length", r.length, "flags", r.flags, "errno", errno, "reason", msg)
			c.s.metrics.Request(x.Name, cmdName(r.cmd), int64(r.length), 0, errno)
			// A refusal takes a request slot like any request, so a client that floods
			// bad requests without reading replies is throttled too.
			if !c.budget.acquire(c.stop, 0) {
				return false, true
			}
			j := newJob(x, &r)
			j.budgeted = true
			j.replyError(c.structured, errno, msg)
			c.inflight.Add(1)
			c.queueReply(j, false)
			continue
		}

		var cost int64
		switch r.cmd {
		case cmdRead, cmdWrite:
			cost = int64(r.length)
		case cmdCache:
			cost = int64(min(r.length, x.maxBlock))
		}
		if !c.budget.acquire(c.stop, cost) {
			return false, true // draining: nothing more is read, so an unread payload does not matter
		}
		j := newJob(x, &r)
		j.cost, j.budgeted = cost, true
		if r.cmd == cmdWrite {
			j.getBuf(int(r.length))
			if _, err := io.ReadFull(c.br, j.buf); err != nil {
				c.budget.release(cost)
				j.recycle()
				c.log.Debug("nbd connection lost in a write payload", "err", err)
				return false, true
			}
		}
		c.inflight.Add(1)
		if r.cmd == cmdRead && c.executing.Load() == 0 && c.br.Buffered() == 0 {
			if !c.runInline(j) {
				return false, false
			}
			continue
		}
		c.admit(j)
	}
}

// admit hands j to an idle worker, or to a new one. Workers live as long as the
// connection, so there is no goroutine (or stack growth) per request, and there are never
// more than the requests in flight plus the writer. Only a READ with nothing else executing
// runs on the reader itself (runInline), watched so that a blocked one does not stop reading.
func (c *conn) admit(j *job) {
	c.handed.Add(1)
	c.executing.Add(1)
	select {
	case c.work <- j:
	default:
		c.workers.Add(1)
		go c.worker(j)
	}
}

// worker executes jobs until the connection's transmission ends.
func (c *conn) worker(j *job) {
	defer c.workers.Done()
	for ok := true; ok; j, ok = <-c.work {
		c.execute(j)
		c.queueReply(j, true)
	}
}

// validate checks a request once, at the protocol edge, in the spec's terms; handlers
// below trust its result. It returns the errno to reply with and the reason.
func (c *conn) validate(x *export, r *request) (Errno, string) {
	ro := x.caps.ReadOnly
	switch r.cmd {
	case cmdRead, cmdCache, cmdFlush:
	case cmdWrite:
		if ro {
			return EPERM, "export is read-only"
		}
	case cmdTrim:
		if ro {
			return EPERM, "export is read-only"
		}
		if c.tflags&tflagSendTrim == 0 {
			return EINVAL, "trim not supported by this export"
		}
	case cmdWriteZeroes:
		if ro {
			return EPERM, "export is read-only"
		}
		if c.tflags&tflagSendWriteZeroes == 0 {
			return EINVAL, "write zeroes not supported by this export"
		}
	case cmdBlockStatus:
		if !c.meta {
			return EINVAL, "block status needs the base:allocation meta context"
		}
	default:
		return EINVAL, "unknown command"
	}

	f := r.flags
	switch {
	case f&^cflagsKnown != 0:
		return EINVAL, "unknown command flag"
	case f&cflagFUA != 0 && c.tflags&tflagSendFUA == 0:
		return EINVAL, "FUA not supported by this export"
	case f&cflagNoHole != 0 && r.cmd != cmdWriteZeroes:
		return EINVAL, "NO_HOLE is only valid on write zeroes"
	case f&cflagFastZero != 0 && (r.cmd != cmdWriteZeroes || c.tflags&tflagSendFastZero == 0):
		return EINVAL, "FAST_ZERO not valid here"
	case f&cflagDF != 0 && (r.cmd != cmdRead || c.tflags&tflagSendDF == 0):
		return EINVAL, "DF not valid here"
	case f&cflagReqOne != 0 && r.cmd != cmdBlockStatus:
		return EINVAL, "REQ_ONE is only valid on block status"
	}

	if r.cmd == cmdFlush {
		if r.offset != 0 || r.length != 0 {
			return EINVAL, "flush offset and length must be zero"
		}
		return 0, ""
	}
	if r.offset > c.size || uint64(r.length) > c.size-r.offset {
		if r.cmd == cmdWrite || r.cmd == cmdWriteZeroes {
			return ENOSPC, "request reaches past the end of the export"
		}
		return EINVAL, "request reaches past the end of the export"
	}
	if mb := uint64(x.minBlock); mb > 1 && (r.offset%mb != 0 || uint64(r.length)%mb != 0) {
		return EINVAL, "request not aligned to the minimum block size"
	}
	// READ and WRITE carry the length as payload; TRIM, WRITE_ZEROES and CACHE are split
	// below, and the block status length is only a hint, so those accept any length.
	if (r.cmd == cmdRead || r.cmd == cmdWrite) && r.length > x.maxBlock {
		return EINVAL, "request above the maximum block size"
	}
	if r.cmd == cmdBlockStatus && r.length == 0 {
		return EINVAL, "zero-length block status"
	}
	return 0, ""
}

// execute performs j's request on the device and sets its reply.
func (c *conn) execute(j *job) {
	start := time.Now()
	errno := c.do(j)
	c.s.metrics.Request(j.x.Name, cmdName(j.r.cmd), int64(j.r.length), time.Since(start), errno)
}

// do performs the request and sets the reply; it returns the errno replied.
func (c *conn) do(j *job) Errno {
	x, r := j.x, &j.r
	dev, ctx := x.Device, c.ctx
	off, n := int64(r.offset), int64(r.length)
	fua := r.flags&cflagFUA != 0
	var err error
	switch r.cmd {
	case cmdRead:
		j.getBuf(int(n))
		if n > 0 {
			err = dev.ReadAt(ctx, j.buf, off)
		}
		if err == nil {
			// Only now, with every byte read and authenticated, is a reply set.
			j.replyData(c.structured, j.buf)
			return 0
		}

	case cmdWrite:
		if n > 0 {
			err = dev.WriteAt(ctx, j.buf, off, fua)
		}

	case cmdFlush:
		err = dev.Flush(ctx)

	case cmdTrim:
		err = dev.Trim(ctx, off, n, fua)

	case cmdWriteZeroes:
		zf := engine.ZeroFlags{NoHole: r.flags&cflagNoHole != 0, FastZero: r.flags&cflagFastZero != 0, FUA: fua}
		err = dev.WriteZeroes(ctx, off, n, zf)

	case cmdCache:
		// There is no cache API: reading pulls the range through the engine (and verifies
		// it), which is what a client asking for CACHE wants before it reads.
		buf := j.getBuf(int(min(n, int64(x.maxBlock))))
		err = split(off, n, int64(x.maxBlock), func(o, k int64) error { return dev.ReadAt(ctx, buf[:k], o) })

	case cmdBlockStatus:
		var descs []desc
		q := min(n, int64(x.maxBlock)) // the length is a hint; keep each device call bounded
		exts, err2 := dev.BlockStatus(ctx, off, q)
		if err = err2; err == nil {
			if descs, err = descriptors(exts, q, int64(x.minBlock), r.flags&cflagReqOne != 0); err != nil {
				c.log.Error("nbd device returned invalid block status", "offset", off, "length", q, "err", err)
				return j.replyError(c.structured, EIO, "invalid block status from device")
			}
			j.replyBlockStatus(descs)
			return 0
		}

	default:
		panic(fmt.Sprintf("BUG: nbd: unvalidated command %d reached a handler", r.cmd))
	}

	errno := errnoFor(r.cmd, r.flags, err)
	if errno != 0 {
		lvl := slog.LevelWarn
		if errno == ENOTSUP || errno == ESHUTDOWN {
			lvl = slog.LevelDebug
		}
		c.log.Log(ctx, lvl, "nbd request failed", "cmd", cmdName(r.cmd), "offset", off, "length", n, "errno", errno, "err", err)
		return j.replyError(c.structured, errno, errnoMessage(errno))
	}
	j.replyOK()
	return 0
}

// split calls fn over [off, off+n) in pieces of at most step (the maximum block size): CACHE
// reads through a bounded buffer whatever the client's length.
func split(off, n, step int64, fn func(off, n int64) error) error {
	for n > 0 {
		k := min(n, step)
		if err := fn(off, k); err != nil {
			return err
		}
		off, n = off+k, n-k
	}
	return nil
}

// desc is one base:allocation block descriptor.
type desc struct{ length, flags uint32 }

func extentFlags(e engine.Extent) uint32 {
	var f uint32
	if e.Hole {
		f |= stateHole
	}
	if e.Zero {
		f |= stateZero
	}
	return f
}

// descriptors turns the device's extents for a query of n bytes (n and the offset aligned
// to mb) into base:allocation descriptors: lengths are multiples of mb (a block split
// between extents gets only the flags all its pieces share, and a block the device did not
// describe gets none), equal neighbours merge, REQ_ONE keeps the first. A device breaking
// its contract (no extents, empty ones, more than n bytes) is an error.
func descriptors(exts []engine.Extent, n, mb int64, reqOne bool) ([]desc, error) {
	var total int64
	for _, e := range exts {
		if e.Length <= 0 {
			return nil, fmt.Errorf("extent of length %d", e.Length)
		}
		total += e.Length
		if total > n {
			return nil, fmt.Errorf("extents cover more than the %d bytes asked", n)
		}
	}
	if total == 0 {
		return nil, errors.New("no extents")
	}
	var out []desc
	add := func(l int64, f uint32) {
		if k := len(out); k > 0 && out[k-1].flags == f {
			out[k-1].length += uint32(l)
			return
		}
		out = append(out, desc{uint32(l), f})
	}
	i, pos := 0, int64(0) // exts[i] starts at pos
	for p := int64(0); p < total && len(out) < maxDescriptors; {
		for pos+exts[i].Length <= p {
			pos += exts[i].Length
			i++
		}
		end := pos + exts[i].Length
		if e := end - end%mb; e > p {
			add(e-p, extentFlags(exts[i]))
			p = e
			continue
		}
		// The block [p, p+mb) ends past this extent.
		f := stateHole | stateZero
		for j, q := i, pos; q < p+mb; j++ {
			if j == len(exts) {
				f = 0
				break
			}
			f &= extentFlags(exts[j])
			q += exts[j].Length
		}
		add(mb, f)
		p += mb
	}
	if reqOne {
		out = out[:1]
	}
	return out, nil
}
