package nbd

import (
	"testing"

	"github.com/sealdisk/sealdisk/internal/fixture"
)

func TestMain(m *testing.M) { fixture.Main(m) }
