package conformance_test

import (
	"fmt"
	"testing"

	"github.com/sealdisk/sealdisk/engine"
	"github.com/sealdisk/sealdisk/engine/conformance"
	"github.com/sealdisk/sealdisk/engine/enginetest"
)

// TestEngine runs the suite against the encrypted engine, on the in-memory store and on a real
// file, with both sector sizes.
func TestEngine(t *testing.T) {
	for _, ss := range []uint32{4096, 512} {
		for _, mem := range []bool{true, false} {
			t.Run(fmt.Sprintf("ss%d-mem%v", ss, mem), func(t *testing.T) {
				conformance.Run(t, int64(ss), func(t *testing.T) engine.BlockDevice {
					return enginetest.Disk(t, conformance.Size, ss, mem, engine.Options{Shards: 2, CacheBytes: 1 << 20})
				})
			})
		}
	}
}
