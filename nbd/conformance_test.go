package nbd

import (
	"context"
	"fmt"
	"sync"
	"sync/atomic"
	"testing"

	"github.com/sealdisk/sealdisk/engine"
	"github.com/sealdisk/sealdisk/engine/conformance"
	"github.com/sealdisk/sealdisk/engine/enginetest"
)

// wireDevice is the block-device API spoken over NBD: every call is an NBD request on one of
// several connections to the server (multi-conn: a flush on one must cover writes made on
// the others), so the conformance suite checks the server and the device behind it together.
// Wire errors come back as the engine's sentinels, the way a client library would map errno.
type wireDevice struct {
	conns []*wireConn
	next  atomic.Uint32
	caps  engine.Caps
	size  int64
}

type wireConn struct {
	mu sync.Mutex // one request at a time per connection; the suite's concurrency spreads over conns
	c  *tclient
}

func openWireDevice(t *testing.T, sock, name string, n int) *wireDevice {
	d := &wireDevice{}
	for range n {
		c := openT(t, sock, name, true, true)
		d.conns = append(d.conns, &wireConn{c: c})
		d.size = int64(c.size)
		f := c.tflags
		d.caps = engine.Caps{
			ReadOnly: f&tflagReadOnly != 0, FUA: f&tflagSendFUA != 0, Trim: f&tflagSendTrim != 0,
			WriteZeroes: f&tflagSendWriteZeroes != 0, FastZero: f&tflagSendFastZero != 0,
			BlockStatus: true, MultiConn: f&tflagCanMultiConn != 0,
			MinBlock: 1, PreferredBlock: 4096, MaxBlock: 32 << 20,
		}
	}
	if !d.caps.MultiConn && n > 1 {
		t.Fatal("server does not advertise multi-conn")
	}
	return d
}

func (d *wireDevice) Size() int64       { return d.size }
func (d *wireDevice) Caps() engine.Caps { return d.caps }

// do sends one request on the next connection. Offsets below zero cannot be put on the wire
// (they are unsigned there); a client refuses them before sending, as libnbd does.
func (d *wireDevice) do(cmd, flags uint16, off int64, length int64, payload []byte) (treply, error) {
	if off < 0 || length < 0 || length > 1<<32-1 {
		return treply{}, fmt.Errorf("client: %w: offset %d length %d", engine.ErrOutOfRange, off, length)
	}
	wc := d.conns[int(d.next.Add(1))%len(d.conns)]
	wc.mu.Lock()
	r := wc.c.do(cmd, flags, uint64(off), uint32(length), payload)
	wc.mu.Unlock()
	return r, wireErr(cmd, r)
}

// wireErr maps an NBD error reply to the engine sentinel the suite expects.
func wireErr(cmd uint16, r treply) error {
	if r.errno == 0 {
		return nil
	}
	var s error
	switch r.errno {
	case EINVAL, ENOSPC:
		s = engine.ErrOutOfRange
	case EOVERFLOW:
		s = engine.ErrTooLarge
	case EPERM:
		s = engine.ErrReadOnly
	case ENOTSUP:
		s = engine.ErrNotFast
	case EIO:
		s = engine.ErrIntegrity
	default:
		return fmt.Errorf("NBD command %d: %s: %s", cmd, r.errno, r.msg)
	}
	return fmt.Errorf("NBD command %d: %w (%s: %s)", cmd, s, r.errno, r.msg)
}

func (d *wireDevice) ReadAt(_ context.Context, p []byte, off int64) error {
	r, err := d.do(cmdRead, 0, off, int64(len(p)), nil)
	if err == nil {
		copy(p, r.data)
	}
	return err
}

func (d *wireDevice) WriteAt(_ context.Context, p []byte, off int64, fua bool) error {
	var f uint16
	if fua {
		f = cflagFUA
	}
	_, err := d.do(cmdWrite, f, off, int64(len(p)), p)
	return err
}

func (d *wireDevice) Flush(context.Context) error {
	// Flush on every connection in turn is not what multi-conn promises; one is enough.
	_, err := d.do(cmdFlush, 0, 0, 0, nil)
	return err
}

func (d *wireDevice) Trim(_ context.Context, off, n int64, fua bool) error {
	var f uint16
	if fua {
		f = cflagFUA
	}
	_, err := d.do(cmdTrim, f, off, n, nil)
	return err
}

func (d *wireDevice) WriteZeroes(_ context.Context, off, n int64, z engine.ZeroFlags) error {
	var f uint16
	if z.NoHole {
		f |= cflagNoHole
	}
	if z.FastZero {
		f |= cflagFastZero
	}
	if z.FUA {
		f |= cflagFUA
	}
	_, err := d.do(cmdWriteZeroes, f, off, n, nil)
	return err
}

func (d *wireDevice) BlockStatus(_ context.Context, off, n int64) ([]engine.Extent, error) {
	r, err := d.do(cmdBlockStatus, 0, off, min(n, 1<<32-1), nil)
	if err != nil {
		return nil, err
	}
	var out []engine.Extent
	for _, e := range r.descs {
		out = append(out, engine.Extent{Length: int64(e.length), Hole: e.flags&stateHole != 0, Zero: e.flags&stateZero != 0})
	}
	return out, nil
}

var _ engine.BlockDevice = (*wireDevice)(nil)

// TestConformanceOverNBD runs the one block-device suite through the server: against the
// encrypted engine (both sector sizes) and the plain in-memory device, each over four
// connections.
func TestConformanceOverNBD(t *testing.T) {
	targets := []struct {
		name string
		bs   int64
		dev  func(t *testing.T) engine.BlockDevice
	}{
		{"memdevice", 512, func(t *testing.T) engine.BlockDevice { return engine.NewMemDevice(conformance.Size, false) }},
		{"engine-4096", 4096, func(t *testing.T) engine.BlockDevice {
			return enginetest.Disk(t, conformance.Size, 4096, true, engine.Options{Shards: 2, CacheBytes: 1 << 20})
		}},
		{"engine-512", 512, func(t *testing.T) engine.BlockDevice {
			return enginetest.Disk(t, conformance.Size, 512, false, engine.Options{Shards: 2, CacheBytes: 1 << 20})
		}},
	}
	for _, tg := range targets {
		t.Run(tg.name, func(t *testing.T) {
			conformance.Run(t, tg.bs, func(t *testing.T) engine.BlockDevice {
				ts := startServer(t, Options{}, Export{Name: "d", Device: tg.dev(t)})
				return openWireDevice(t, ts.sock, "d", 4)
			})
		})
	}
	t.Run("read-only", func(t *testing.T) {
		conformance.RunReadOnly(t, 4096, func(t *testing.T) engine.BlockDevice {
			ts := startServer(t, Options{}, Export{Name: "d", Device: engine.NewMemDevice(conformance.Size, true)})
			return openWireDevice(t, ts.sock, "d", 2)
		})
	})
}
