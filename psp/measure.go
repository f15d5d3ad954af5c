package psp

import (
	"crypto/sha512"
	"fmt"
	"io"
	"os"

	"github.com/emmansun/gmsm/sm3"

	"github.com/sealdisk/sealdisk/format"
)

// Measure hashes a firmware file (FORMAT.md §9), streaming it: OVMF images are a few MiB
// but nothing stops a larger one.
func Measure(path string, alg format.MeasureAlg) ([]byte, error) {
	f, err := os.Open(path)
	if err != nil {
		return nil, fmt.Errorf("failed to measure firmware: %w", err)
	}
	defer f.Close()
	var h interface {
		io.Writer
		Sum([]byte) []byte
	}
	switch alg {
	case format.MeasureSHA384:
		h = sha512.New384()
	case format.MeasureSM3:
		h = sm3.New()
	default:
		return nil, fmt.Errorf("failed to measure firmware: unknown algorithm %d", uint16(alg))
	}
	if _, err := io.Copy(h, f); err != nil {
		return nil, fmt.Errorf("failed to measure firmware %s: %w", path, err)
	}
	return h.Sum(nil), nil
}
