package broker_test

import (
	"bytes"
	"encoding/json"
	"net/http"
	"runtime"
	"sort"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/sealdisk/sealdisk/broker"
	"github.com/sealdisk/sealdisk/internal/fixture"
)

// BenchmarkRelease measures the broker's release over real HTTPS (TLS 1.3, kept-alive
// connections) with the store, replay marks and the synced audit log on the test's temporary
// directory. Challenges and the PSP's reports over them are made before the timer: the
// timed part is the release request alone — nonce check, replay mark, report chain and
// signature, certificate and policy, key file open, HPKE seal to the chip (ML-KEM-768+X25519
// here: the shared fixture's chip is DHKEM(P-384), so a chip of the default KEM is made), the
// audit append with fsync — plus the client's HTTP work, in the same process. It reports the
// sequential latency's p50 and p99, releases/s with GOMAXPROCS (-cpu) parallel clients, and
// releases per CPU-second of the process.
// BENCHMARKS.md has the command and the figures.
func BenchmarkRelease(b *testing.B) {
	w, err := fixture.NewWorld(b.TempDir(), fixture.Options{})
	if err != nil {
		b.Fatal(err)
	}
	h := newHarnessIn(b, "", w)
	url := h.start(b, h.cfgPath)
	h.putKeys(b, url)
	c := h.client(b, false)
	attest, cert := h.attester(b, "k-ok", "vm1")
	reqs := make([][]byte, b.N)
	for i := range reqs {
		n := h.challenge(b, c, url, "k-ok")
		rep, err := attest(n)
		if err != nil {
			b.Fatal(err)
		}
		reqs[i], _ = json.Marshal(broker.ReleaseRequest{KeyID: "k-ok", Nonce: n, Report: rep, Certificate: cert})
	}
	send := func(body []byte) time.Duration {
		start := time.Now()
		resp, err := c.Post(url+"/v1/release", "application/json", bytes.NewReader(body))
		if err != nil {
			b.Fatal(err)
		}
		resp.Body.Close()
		if resp.StatusCode != http.StatusOK {
			b.Fatalf("release: %s", resp.Status)
		}
		return time.Since(start)
	}
	send(reqs[0]) // warm the connection
	half := len(reqs) / 2
	b.ResetTimer()
	lat := make([]time.Duration, 0, half)
	for _, r := range reqs[1 : half+1] {
		lat = append(lat, send(r))
	}
	sort.Slice(lat, func(i, j int) bool { return lat[i] < lat[j] })
	// Throughput: the other half from as many clients as GOMAXPROCS.
	par := runtime.GOMAXPROCS(0)
	var wg sync.WaitGroup
	work := make(chan []byte)
	cpu0 := cpuTime()
	start := time.Now()
	for range par {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for r := range work {
				send(r)
			}
		}()
	}
	for _, r := range reqs[half+1:] {
		work <- r
	}
	close(work)
	wg.Wait()
	el := time.Since(start)
	cpu := cpuTime() - cpu0
	b.StopTimer()
	if len(lat) > 0 {
		b.ReportMetric(float64(lat[len(lat)/2].Microseconds()), "p50-µs")
		b.ReportMetric(float64(lat[len(lat)*99/100].Microseconds()), "p99-µs")
	}
	if n := len(reqs) - half - 1; n > 0 {
		b.ReportMetric(float64(n)/el.Seconds(), "releases/s")
		// CPU time of the whole process (server and in-process client) per release: what a
		// core can do when it does nothing else, whatever else the machine is running.
		b.ReportMetric(float64(n)/cpu.Seconds(), "releases/core-s")
	}
}

// cpuTime is this process's user+system CPU time.
func cpuTime() time.Duration {
	var ru syscall.Rusage
	syscall.Getrusage(syscall.RUSAGE_SELF, &ru)
	return time.Duration(ru.Utime.Nano() + ru.Stime.Nano())
}
