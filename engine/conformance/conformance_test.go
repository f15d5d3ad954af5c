package conformance_test

import (
	"testing"

	"github.com/sealdisk/sealdisk/engine"
	"github.com/sealdisk/sealdisk/engine/conformance"
)

func TestMemDevice(t *testing.T) {
	conformance.Run(t, 4096, func(t *testing.T) engine.BlockDevice {
		return engine.NewMemDevice(conformance.Size, false)
	})
}
