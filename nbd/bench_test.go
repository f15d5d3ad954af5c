package nbd

import (
	"bufio"
	"encoding/binary"
	"io"
	"math/rand/v2"
	"net"
	"os"
	"testing"

	"github.com/sealdisk/sealdisk/engine"
)

// The transmission path's per-request cost: one raw client over a Unix socket keeps depth
// requests in flight against a MemDevice (so the device costs almost nothing) and counts
// completed requests, like fio --ioengine=nbd --iodepth=32. Structured replies on, as libnbd
// negotiates them.
//
//	go test -run='^$' -bench=Transmit -cpuprofile=cpu.out ./nbd

func BenchmarkTransmitRandRead4K(b *testing.B)  { benchTransmit(b, cmdRead, 4096, 32) }
func BenchmarkTransmitRandWrite4K(b *testing.B) { benchTransmit(b, cmdWrite, 4096, 32) }
func BenchmarkTransmitRead1M(b *testing.B)      { benchTransmit(b, cmdRead, 1<<20, 8) }
func BenchmarkTransmitWrite1M(b *testing.B)     { benchTransmit(b, cmdWrite, 1<<20, 8) }

func benchTransmit(b *testing.B, cmd uint16, bs uint32, depth int) {
	const size = 256 << 20
	dev := engine.NewMemDevice(size, false)
	// Allocate every chunk so reads copy real data, as the engine's do.
	fill := make([]byte, 1<<20)
	for off := int64(0); off < size; off += int64(len(fill)) {
		if err := dev.WriteAt(b.Context(), fill, off, false); err != nil {
			b.Fatal(err)
		}
	}
	ts := startServer(b, Options{}, Export{Name: "m", Device: dev})
	c := dialT(b, ts.sock)
	c.open("m", true, false)
	nc := c.c

	slots := make(chan struct{}, depth)
	for range depth {
		slots <- struct{}{}
	}
	done := make(chan error, 1)
	// Receiver: parse replies (structured for reads, simple for writes), free a slot each.
	go func() {
		br := c.br
		if br.Buffered() == 0 {
			br = bufio.NewReaderSize(nc, 256<<10) // fewer client syscalls for large reads
		}
		var h [32]byte
		for i := 0; i < b.N; i++ {
			if _, err := io.ReadFull(br, h[:4]); err != nil {
				done <- err
				return
			}
			switch binary.BigEndian.Uint32(h[:4]) {
			case magicSimpleReply:
				if _, err := io.ReadFull(br, h[:12]); err != nil {
					done <- err
					return
				}
				if e := binary.BigEndian.Uint32(h[:4]); e != 0 {
					b.Errorf("errno %d", e)
				}
			case magicStructReply:
				if _, err := io.ReadFull(br, h[:16]); err != nil {
					done <- err
					return
				}
				if _, err := br.Discard(int(binary.BigEndian.Uint32(h[12:16]))); err != nil {
					done <- err
					return
				}
				if typ := binary.BigEndian.Uint16(h[2:4]); typ != replyTypeOffsetData {
					b.Errorf("reply type %#x", typ)
				}
			default:
				b.Errorf("bad magic")
			}
			slots <- struct{}{}
		}
		done <- nil
	}()

	bw := bufio.NewWriterSize(nc, 256<<10)
	payload := make([]byte, bs)
	blocks := uint64(size / bs)
	rng := rand.New(rand.NewPCG(1, 2))
	var hdr [requestHeaderSize]byte
	b.SetBytes(int64(bs))
	b.ResetTimer()
	for i := 0; i < b.N; i++ {
		<-slots
		binary.BigEndian.PutUint32(hdr[0:], magicRequest)
		binary.BigEndian.PutUint16(hdr[4:], 0)
		binary.BigEndian.PutUint16(hdr[6:], cmd)
		binary.BigEndian.PutUint64(hdr[8:], uint64(i))
		binary.BigEndian.PutUint64(hdr[16:], rng.Uint64N(blocks)*uint64(bs))
		binary.BigEndian.PutUint32(hdr[24:], bs)
		bw.Write(hdr[:])
		if cmd == cmdWrite {
			bw.Write(payload)
		}
		// One send per request, as libnbd does.
		if err := bw.Flush(); err != nil {
			b.Fatal(err)
		}
	}
	if err := bw.Flush(); err != nil {
		b.Fatal(err)
	}
	if err := <-done; err != nil {
		b.Fatal(err)
	}
	b.StopTimer()
	b.ReportMetric(float64(b.N)/b.Elapsed().Seconds(), "req/s")
	nc.(*net.UnixConn).CloseWrite()
}

// TestFioMemDevice runs scripts/bench/fio-nbd.sh (fio --ioengine=nbd, the four BENCHMARKS.md
// workloads) against this server over a MemDevice: the NBD server's own ceiling, without
// the engine. Opt-in, it measures rather than checks:
//
//	NBD_FIO_BENCH=$PWD/scripts/bench/fio-nbd.sh RT=5 go test -run=FioMemDevice -v -cpuprofile=cpu.out ./nbd
func TestFioMemDevice(t *testing.T) {
	script := os.Getenv("NBD_FIO_BENCH")
	if script == "" {
		t.Skip("NBD_FIO_BENCH (path of fio-nbd.sh) not set: measurement only")
	}
	requireTool(t, "fio")
	dev := engine.NewMemDevice(1<<30, false)
	fill := make([]byte, 1<<20)
	for off := int64(0); off < 1<<30; off += int64(len(fill)) {
		if err := dev.WriteAt(t.Context(), fill, off, false); err != nil {
			t.Fatal(err)
		}
	}
	ts := startServer(t, Options{}, Export{Name: "m", Device: dev})
	t.Log("\n" + run(t, nil, "bash", script, nbdURI(ts.sock, "m"), "nbd-memdevice"))
}
