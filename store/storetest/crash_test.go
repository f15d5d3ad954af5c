package storetest

import (
	"bytes"
	"math/rand"
	"testing"
)

func read(t *testing.T, c *Crash, off, n int64) []byte {
	b := make([]byte, n)
	if _, err := c.ReadAt(b, off); err != nil {
		t.Fatal(err)
	}
	return b
}

func TestCrashKeepsSyncedAndUnitsOfPending(t *testing.T) {
	c := &Crash{Units: func(int64) int64 { return 512 }}
	c.Truncate(8192)
	c.WriteAt(bytes.Repeat([]byte{1}, 1024), 0)
	c.Sync()
	c.WriteAt(bytes.Repeat([]byte{2}, 2048), 512)
	if got := read(t, c, 0, 4096); got[0] != 1 || got[600] != 2 || got[3000] != 0 {
		t.Fatal("reads must see pending writes")
	}
	r := rand.New(rand.NewSource(1))
	if got := read(t, c.Crash(r, 0), 0, 4096); got[0] != 1 || got[600] != 1 || got[1500] != 0 {
		t.Fatal("keep=0 must leave exactly the synced state")
	}
	if got := read(t, c.Crash(r, 1), 0, 4096); !bytes.Equal(got, read(t, c, 0, 4096)) {
		t.Fatal("keep=1 must keep every pending write")
	}
	mixed := 0
	for i := 0; i < 50; i++ {
		got := read(t, c.Crash(r, 0.5), 512, 2048)
		for u := 0; u < 4; u++ {
			unit := got[u*512 : (u+1)*512]
			if !bytes.Equal(unit, bytes.Repeat([]byte{unit[0]}, 512)) {
				t.Fatal("a 512-byte unit was torn")
			}
		}
		if got[0] != got[2047] {
			mixed++
		}
	}
	if mixed == 0 {
		t.Fatal("keep=0.5 never kept part of a write")
	}
	c.Punch(0, 100)
	if read(t, c, 0, 1)[0] != 0 {
		t.Fatal("punch")
	}
}
