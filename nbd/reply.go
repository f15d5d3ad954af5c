package nbd

import (
	"encoding/binary"
	"net"
	"runtime"
	"sync"
)

// job carries one request from the reader to its written reply. The reader fills the
// request, its budget cost and, for a WRITE, the payload; execute (on a worker)
// fills the reply; the writer sends it and recycles the job and its buffer. Jobs and buffers
// are pooled, so a steady stream of READs and WRITEs allocates nothing.
type job struct {
	x        *export
	r        request
	cost     int64
	budgeted bool // holds a budget slot (released once the reply is written)

	bp   *[]byte  // pooled (getBuf) buffer behind buf
	buf  []byte   // WRITE payload or READ data (*bp); nil otherwise
	hdr  [96]byte // the reply's header and small payload (simple reply, chunk header, error)
	hlen int      // bytes of hdr to send
	data []byte   // sent after hdr: read data (a slice of buf) or ext
	ext  []byte   // a reply payload too big for hdr (block status, long messages)
}

var jobPool = sync.Pool{New: func() any { return new(job) }}

func newJob(x *export, r *request) *job {
	j := jobPool.Get().(*job)
	j.x, j.r = x, *r
	return j
}

// getBuf gives the job a pooled buffer of n bytes, returned by recycle.
func (j *job) getBuf(n int) []byte {
	j.bp = getBuf(n)
	j.buf = *j.bp
	return j.buf
}

// recycle returns the job's buffer and the job to their pools.
func (j *job) recycle() {
	if j.bp != nil {
		putBuf(j.bp)
	}
	*j = job{}
	jobPool.Put(j)
}

// Reply encoders: each sets the job's reply, overwriting any earlier one.

func (j *job) replyOK() {
	j.hlen = len(appendSimpleReply(j.hdr[:0], 0, j.r.handle))
	j.data = nil
}

// replyError sets an error reply: a structured error chunk when negotiated (it carries a
// message, and a READ must not get a simple reply then), a simple reply otherwise.
func (j *job) replyError(structured bool, errno Errno, msg string) Errno {
	j.data = nil
	if !structured {
		j.hlen = len(appendSimpleReply(j.hdr[:0], errno, j.r.handle))
		return errno
	}
	if 26+len(msg) <= len(j.hdr) {
		j.hlen = len(appendErrorChunk(j.hdr[:0], j.r.handle, errno, msg))
		return errno
	}
	j.ext = appendErrorChunk(make([]byte, 0, 26+len(msg)), j.r.handle, errno, msg)
	j.hlen, j.data = 0, j.ext
	return errno
}

// replyData sets a successful read: one data chunk (structured) or header plus data.
func (j *job) replyData(structured bool, data []byte) {
	j.data = data
	switch {
	case !structured:
		j.hlen = len(appendSimpleReply(j.hdr[:0], 0, j.r.handle))
	case len(data) == 0:
		j.hlen = len(appendChunkHeader(j.hdr[:0], replyFlagDone, replyTypeNone, j.r.handle, 0))
	default:
		h := appendChunkHeader(j.hdr[:0], replyFlagDone, replyTypeOffsetData, j.r.handle, 8+len(data))
		j.hlen = len(binary.BigEndian.AppendUint64(h, j.r.offset))
	}
}

func (j *job) replyBlockStatus(descs []desc) {
	b := appendChunkHeader(make([]byte, 0, 24+8*len(descs)), replyFlagDone, replyTypeBlockStatus, j.r.handle, 4+8*len(descs))
	b = binary.BigEndian.AppendUint32(b, metaContextID)
	for _, d := range descs {
		b = binary.BigEndian.AppendUint32(b, d.length)
		b = binary.BigEndian.AppendUint32(b, d.flags)
	}
	j.ext = b
	j.hlen, j.data = 0, b
}

// queueReply hands a finished job's reply to the writer. If nobody is writing, the caller
// becomes the writer: it takes every queued reply and writes them with one writev (TLS: one
// buffered write and flush), then again while replies keep arriving. Whoever finishes
// meanwhile only appends and returns, so replies completed during one write go out together
// in the next syscall, and no goroutine is ever woken just to write.
//
// fromWorker is false on the reader (refusals): it writes one batch, then
// leaves further batches to the workers still executing and goes back to reading. A worker
// that executes always comes back through here, which is what makes leaving safe.
func (c *conn) queueReply(j *job, fromWorker bool) {
	c.wmu.Lock()
	if fromWorker {
		c.executing.Add(-1)
	}
	c.queue = append(c.queue, j)
	if c.writing {
		c.wmu.Unlock()
		return
	}
	c.writing = true
	if c.executing.Load() > 0 {
		// Others are executing, and may be runnable already (completions arrive in
		// batches): let them run first, so their replies join this write. A yield, not a
		// wait: a slow request delays nobody.
		c.wmu.Unlock()
		runtime.Gosched()
		c.wmu.Lock()
	}
	for {
		batch := c.queue
		c.queue, c.spare = c.spare[:0], nil
		c.wmu.Unlock()

		c.writeBatch(batch)
		clear(batch)

		c.wmu.Lock()
		c.spare = batch[:0]
		if len(c.queue) == 0 || (!fromWorker && c.executing.Load() > 0) {
			c.writing = false
			c.wmu.Unlock()
			return
		}
	}
}

// writeBatch sends the replies of batch in order, then releases what each held. After a
// write error nothing more is sent: the raw connection is closed so the reader fails, and
// the remaining jobs are only released.
func (c *conn) writeBatch(batch []*job) {
	if c.werr == nil {
		if c.vec {
			iovs := c.iovs[:0]
			for _, j := range batch {
				if j.hlen > 0 {
					iovs = append(iovs, j.hdr[:j.hlen])
				}
				if len(j.data) > 0 {
					iovs = append(iovs, j.data)
				}
			}
			c.iov = iovs
			_, c.werr = c.iov.WriteTo(c.wconn) // writev; consumes c.iov, not iovs
			clear(iovs)
			c.iovs = iovs[:0]
		} else {
			for _, j := range batch {
				c.bw.Write(j.hdr[:j.hlen])
				c.bw.Write(j.data) // a sticky error shows in Flush
			}
			c.werr = c.bw.Flush()
		}
		if c.werr != nil {
			c.raw.Close() // the reader fails on the closed socket
		}
	}
	for _, j := range batch {
		if j.budgeted {
			c.budget.release(j.cost)
		}
		j.recycle()
		c.inflight.Done()
	}
}

// canWritev reports whether replies can go to nc with writev straight from their buffers;
// other connections (TLS) get them through bw, so one batch is one write of records.
func canWritev(nc net.Conn) bool {
	switch nc.(type) {
	case *net.UnixConn, *net.TCPConn:
		return true
	}
	return false
}
