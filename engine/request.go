package engine

import (
	"context"
	"fmt"
	"sync"

	"github.com/sealdisk/sealdisk/dma"
)

// request gathers the descriptors of one frontend call. Requests are pooled with their
// descriptors: a read or write then allocates nothing of its own.
type request struct {
	wg    sync.WaitGroup
	mu    sync.Mutex // guards err
	err   error
	descs []dma.Descriptor      // owned by the submitter, except from Push to Complete (dma)
	done  func(*dma.Descriptor) // complete, as the descriptors' Complete (made once, not per call)
}

var requestPool = sync.Pool{New: func() any {
	r := new(request)
	r.done = r.complete
	return r
}}

// getRequest returns an empty request with n zero descriptors.
func getRequest(n int) *request {
	r := requestPool.Get().(*request)
	if cap(r.descs) < n {
		r.descs = make([]dma.Descriptor, n)
	}
	r.descs = r.descs[:n]
	return r
}

// put returns r to the pool once every descriptor has completed; nothing it held (guest
// buffers, the disk) stays reachable from the pool.
func (r *request) put() {
	clear(r.descs)
	r.descs = r.descs[:0]
	r.err = nil
	requestPool.Put(r)
}

func (r *request) complete(desc *dma.Descriptor) {
	if desc.Status != nil {
		r.mu.Lock()
		if r.err == nil {
			r.err = desc.Status
		}
		r.mu.Unlock()
	}
	r.wg.Done()
}

// submit splits [off, off+len) — or the sector range of a buffer-less op — into one
// descriptor per stripe, pushes them to their shards and waits for all completions.
func (d *Disk) submit(ctx context.Context, op dma.Op, buf []byte, off, n int64, flags dma.Flags) error {
	if err := d.admit(); err != nil {
		return err
	}
	defer d.done()
	stripe := int64(d.e.opts.StripeSectors) * d.ss
	// With the memory-encryption stage the payload lives in (simulated) guest memory: buf
	// becomes a buffer encrypted under the VM's VEK, and caller keeps the caller's buffer.
	var caller []byte
	if d.e.mem != nil && (op == dma.OpRead || op == dma.OpWrite) {
		caller, buf = buf, make([]byte, n)
		if op == dma.OpWrite {
			copy(buf, caller)
		}
		defer clear(buf)
	}
	req := getRequest(int((off+n-1)/stripe - off/stripe + 1))
	defer req.put()
	for i, pos := 0, off; pos < off+n; i++ {
		end := min((pos/stripe+1)*stripe, off+n)
		lba := uint64(pos / d.ss)
		head := pos - int64(lba)*d.ss
		desc := &req.descs[i]
		*desc = dma.Descriptor{
			Op: op, ASID: uint32(d.asid), LBA: lba, Count: uint32((head + end - pos + d.ss - 1) / d.ss),
			Head: uint32(head), Len: uint32(end - pos), Flags: flags, Target: d, Complete: req.done,
		}
		switch {
		case op == dma.OpStatus:
			desc.Buf = buf[(pos-off)/d.ss : (end-off)/d.ss]
		case buf != nil:
			desc.Buf = buf[pos-off : end-off]
		}
		if caller != nil && op == dma.OpWrite {
			if err := d.e.mem.Seal(desc); err != nil {
				return fmt.Errorf("%w: %v", ErrPermission, err)
			}
		}
		pos = end
	}
	descs := req.descs
	req.wg.Add(len(descs))
	for i := range descs {
		desc := &descs[i]
		if err := ctx.Err(); err != nil {
			req.wg.Add(-(len(descs) - i))
			req.wg.Wait()
			return err
		}
		s := d.e.shards[d.shardOf(desc.LBA)]
		// The last descriptor may run here while the shards work on the others.
		if i == len(descs)-1 && s.inline(desc) {
			continue
		}
		if err := s.sq.Push(desc); err != nil {
			req.wg.Add(-(len(descs) - i))
			req.wg.Wait()
			return ErrDetached
		}
	}
	req.wg.Wait()
	if req.err == nil && caller != nil && op == dma.OpRead {
		for i := range descs {
			if err := d.e.mem.Open(&descs[i]); err != nil {
				return fmt.Errorf("%w: %v", ErrPermission, err)
			}
		}
		copy(caller, buf)
	}
	return req.err
}

// onShards performs a buffer-less op on every shard and waits for all of them.
func (d *Disk) onShards(op dma.Op) error {
	req := &request{}
	req.wg.Add(len(d.e.shards))
	for i, s := range d.e.shards {
		desc := &dma.Descriptor{Op: op, ASID: uint32(d.asid), Target: d, Complete: req.complete}
		if err := s.sq.Push(desc); err != nil {
			req.wg.Add(-(len(d.e.shards) - i))
			req.wg.Wait()
			return ErrDetached
		}
	}
	req.wg.Wait()
	return req.err
}
