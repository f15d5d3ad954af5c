package nbd

import (
	"bytes"
	"testing"
	"time"
)

// serverConn returns the server side of the only connection of ts.
func serverConn(t *testing.T, ts *testServer) *conn {
	t.Helper()
	ts.mu.Lock()
	defer ts.mu.Unlock()
	if len(ts.conns) != 1 {
		t.Fatalf("%d connections, want 1", len(ts.conns))
	}
	for c := range ts.conns {
		return c
	}
	return nil
}

// waitFor polls cond for up to 10 s.
func waitFor(t *testing.T, what string, cond func() bool) {
	t.Helper()
	for deadline := time.Now().Add(10 * time.Second); !cond(); time.Sleep(5 * time.Millisecond) {
		if time.Now().After(deadline) {
			t.Fatalf("timed out waiting for %s", what)
		}
	}
}

// TestReadsRunInline: one READ at a time runs on the reader; none goes to a worker.
func TestReadsRunInline(t *testing.T) {
	dev := newTestDevice(1<<20, nil)
	ts := startServer(t, Options{}, Export{Name: "d", Device: dev})
	c := openT(t, ts.sock, "d", true, false)
	want := pattern(4096, 7)
	c.do(cmdWrite, 0, 8192, 4096, want)
	sc := serverConn(t, ts)
	before := sc.handed.Load()
	for range 100 {
		if r := c.do(cmdRead, 0, 8192, 4096, nil); r.errno != 0 || !bytes.Equal(r.data, want) {
			t.Fatalf("read: errno %v", r.errno)
		}
	}
	if n := sc.handed.Load() - before; n != 0 {
		t.Fatalf("100 reads one at a time went to workers %d times, want 0 (reads inline)", n)
	}
}

// TestInlineReadRescued: a slow read does not hold back a later one, whose reply comes first
// with its own handle and data — also when the slow one runs on the reader: the request sent
// behind it is read and answered first, also after the watch has parked (no inline
// request for a while) and on a reader that was itself a rescuer. The watch ends with the
// last connection.
func TestInlineReadRescued(t *testing.T) {
	dev := newTestDevice(1<<20, nil)
	ts := startServer(t, Options{}, Export{Name: "d", Device: dev})
	c := openT(t, ts.sock, "d", true, false)
	a, b := pattern(4096, 1), pattern(4096, 2)
	c.do(cmdWrite, 0, 0, 4096, a)
	c.do(cmdWrite, 0, 65536, 4096, b)
	c.c.SetReadDeadline(time.Now().Add(20 * time.Second)) // a reader left blocked fails here, not at the test timeout

	for round := range 3 {
		if round > 0 {
			waitFor(t, "the watch to park", ts.rescue.parked.Load)
		}
		release := dev.gate(0)
		c.send(cmdRead, 0, 100, 0, 4096, nil)
		if off := <-dev.enterc; off != 0 {
			t.Fatalf("gated read at %d", off)
		}
		c.send(cmdRead, 0, 200, 65536, 4096, nil)
		if r := c.recv(); r.handle != 200 || !bytes.Equal(r.data, b) {
			t.Fatalf("round %d: first reply has handle %d, want the read behind the blocked one", round, r.handle)
		}
		release()
		if r := c.recv(); r.handle != 100 || !bytes.Equal(r.data, a) {
			t.Fatalf("round %d: second reply: handle %d", round, r.handle)
		}
	}
	waitFor(t, "the watch to park", ts.rescue.parked.Load) // the last connection's end must wake it
	c.send(cmdDisc, 0, 300, 0, 0, nil)
	c.expectClosed()
	waitFor(t, "the watch to end", func() bool {
		ts.rescue.mu.Lock()
		defer ts.rescue.mu.Unlock()
		return !ts.rescue.running
	})
}
