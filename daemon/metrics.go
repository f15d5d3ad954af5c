package daemon

import (
	"net/http"
	"strconv"
	"sync"
	"sync/atomic"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/collectors"
	"github.com/prometheus/client_golang/prometheus/promhttp"

	"github.com/sealdisk/sealdisk/nbd"
)

// metrics is the service's Prometheus registry (a private one: no Go-runtime defaults beyond
// the process and Go collectors registered here). Names are listed in docs/OPERATOR.md.
type metrics struct {
	reg            *prometheus.Registry
	nbd            *nbdMetrics
	attachFailures prometheus.Counter
}

func newMetrics(d *Daemon) *metrics {
	reg := prometheus.NewRegistry()
	m := &metrics{reg: reg}
	reg.MustRegister(collectors.NewGoCollector(), collectors.NewProcessCollector(collectors.ProcessCollectorOpts{}))
	m.attachFailures = prometheus.NewCounter(prometheus.CounterOpts{
		Name: "sealdisk_vm_attach_failures_total", Help: "VM attaches refused or failed (PSP checks, image, conflicts).",
	})
	reg.MustRegister(m.attachFailures)
	reg.MustRegister(prometheus.NewGaugeFunc(prometheus.GaugeOpts{
		Name: "sealdisk_vms_attached", Help: "VMs whose disks are being served.",
	}, func() float64 {
		d.mu.Lock()
		defer d.mu.Unlock()
		return float64(len(d.vms))
	}))
	st := &d.eng.Stats
	for _, c := range []struct {
		name, help string
		v          *atomic.Uint64
	}{
		{"sealdisk_engine_reads_total", "Read descriptors completed by the engine.", &st.Reads},
		{"sealdisk_engine_writes_total", "Write descriptors completed by the engine.", &st.Writes},
		{"sealdisk_engine_flushes_total", "Flushes completed by the engine.", &st.Flushes},
		{"sealdisk_engine_trims_total", "Trim and write-zeroes descriptors completed by the engine.", &st.Trims},
		{"sealdisk_engine_read_bytes_total", "Bytes read by guests through the engine.", &st.BytesRead},
		{"sealdisk_engine_written_bytes_total", "Bytes written by guests through the engine.", &st.BytesWritten},
		{"sealdisk_engine_cache_hits_total", "Sector reads served from the plaintext cache.", &st.CacheHits},
		{"sealdisk_engine_cache_misses_total", "Sector reads that decrypted from the image.", &st.CacheMisses},
		{"sealdisk_engine_writebacks_total", "Dirty cache sectors encrypted and written back.", &st.Writebacks},
		{"sealdisk_engine_journal_syncs_total", "Metadata journal syncs.", &st.JournalSyncs},
		{"sealdisk_engine_placed_sectors_total", "Sectors written to the image once, in place, their journal blocks holding only entries (engine.placed_run).", &st.Placed},
		{"sealdisk_engine_direct_sectors_total", "Of the placed sectors, those sealed straight from a guest write, never cached.", &st.Direct},
		{"sealdisk_engine_auth_failures_total", "Sectors that failed authentication (tampered or corrupt); each is an I/O error to the guest.", &st.AuthFailures},
		{"sealdisk_engine_permission_denials_total", "Descriptors refused because no key was bound to their ASID.", &st.PermissionDenials},
		{"sealdisk_engine_sync_failures_total", "Failed syncs of an image: each may have lost recent writes on disk, so the journal and the journaled sectors are written again before a sync is trusted.", &st.SyncFailures},
	} {
		v := c.v
		reg.MustRegister(prometheus.NewCounterFunc(prometheus.CounterOpts{Name: c.name, Help: c.help},
			func() float64 { return float64(v.Load()) }))
	}
	reg.MustRegister(&ringCollector{d: d, desc: prometheus.NewDesc("sealdisk_engine_ring_occupancy",
		"Descriptors waiting in each shard's submission ring.", []string{"shard"}, nil)})
	reg.MustRegister(&mappedCollector{d: d, desc: prometheus.NewDesc("sealdisk_vm_image_mapped_bytes",
		"Bytes of the VM disk's image file that reads copy from a mapping; 0: every read is a pread.", []string{"vm", "disk"}, nil)})
	m.nbd = newNBDMetrics(reg)
	return m
}

func (m *metrics) handler() http.Handler {
	return promhttp.HandlerFor(m.reg, promhttp.HandlerOpts{})
}

type ringCollector struct {
	d    *Daemon
	desc *prometheus.Desc
}

func (c *ringCollector) Describe(ch chan<- *prometheus.Desc) { ch <- c.desc }

func (c *ringCollector) Collect(ch chan<- prometheus.Metric) {
	for i, n := range c.d.eng.RingOccupancy() {
		ch <- prometheus.MustNewConstMetric(c.desc, prometheus.GaugeValue, float64(n), strconv.Itoa(i))
	}
}

type mappedCollector struct {
	d    *Daemon
	desc *prometheus.Desc
}

func (c *mappedCollector) Describe(ch chan<- *prometheus.Desc) { ch <- c.desc }

func (c *mappedCollector) Collect(ch chan<- prometheus.Metric) {
	c.d.mu.Lock()
	defer c.d.mu.Unlock()
	for name, vm := range c.d.vms {
		for _, ad := range vm.Disks {
			ch <- prometheus.MustNewConstMetric(c.desc, prometheus.GaugeValue, float64(ad.Dev.Mapped()), name, diskLabel(ad))
		}
	}
}

// nbdMetrics adapts nbd.Metrics to Prometheus. The per-request path looks its series up in a
// map of already-resolved children, so a request costs a map read, not label hashing.
type nbdMetrics struct {
	conns    *prometheus.GaugeVec
	requests *prometheus.CounterVec
	bytes    *prometheus.CounterVec
	latency  *prometheus.HistogramVec

	children sync.Map // opKey -> *opSeries
}

type opKey struct {
	export, op string
	errno      nbd.Errno
}

type opSeries struct {
	requests, bytes prometheus.Counter
	latency         prometheus.Observer
}

var _ nbd.Metrics = (*nbdMetrics)(nil)

func newNBDMetrics(reg *prometheus.Registry) *nbdMetrics {
	m := &nbdMetrics{
		conns: prometheus.NewGaugeVec(prometheus.GaugeOpts{
			Name: "sealdisk_nbd_connections", Help: "NBD connections in transmission, by export.",
		}, []string{"export"}),
		requests: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "sealdisk_nbd_requests_total", Help: "NBD requests answered, by export, command and result (ok or the errno).",
		}, []string{"export", "op", "result"}),
		bytes: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "sealdisk_nbd_request_bytes_total", Help: "Bytes requested by successful NBD requests, by export and command.",
		}, []string{"export", "op"}),
		latency: prometheus.NewHistogramVec(prometheus.HistogramOpts{
			Name: "sealdisk_nbd_request_duration_seconds", Help: "NBD request latency from receipt to reply, by export and command.",
			Buckets: prometheus.ExponentialBuckets(10e-6, 4, 10), // 10 µs .. 2.6 s
		}, []string{"export", "op"}),
	}
	reg.MustRegister(m.conns, m.requests, m.bytes, m.latency)
	return m
}

func (m *nbdMetrics) Connections(export string, delta int) {
	m.conns.WithLabelValues(export).Add(float64(delta))
}

func (m *nbdMetrics) Request(export, op string, n int64, d time.Duration, errno nbd.Errno) {
	k := opKey{export, op, errno}
	v, ok := m.children.Load(k)
	if !ok {
		result := "ok"
		if errno != 0 {
			result = errno.String()
		}
		v, _ = m.children.LoadOrStore(k, &opSeries{
			requests: m.requests.WithLabelValues(export, op, result),
			bytes:    m.bytes.WithLabelValues(export, op),
			latency:  m.latency.WithLabelValues(export, op),
		})
	}
	s := v.(*opSeries)
	s.requests.Inc()
	if errno == 0 {
		s.bytes.Add(float64(n))
	}
	s.latency.Observe(d.Seconds())
}

// diskLabel is a disk's "disk" label: its index in the VM, or "nvram".
func diskLabel(ad *Disk) string {
	if ad.Config.NVRAM {
		return "nvram"
	}
	return strconv.Itoa(ad.Index)
}
