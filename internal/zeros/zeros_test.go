package zeros

import "testing"

func TestAll(t *testing.T) {
	for n := 0; n <= 40; n++ {
		b := make([]byte, n)
		if !All(b) {
			t.Fatalf("%d zero bytes: not all zero", n)
		}
		for i := range n {
			b[i] = 1
			if All(b) {
				t.Fatalf("%d bytes with byte %d set: all zero", n, i)
			}
			b[i] = 0
		}
	}
}
