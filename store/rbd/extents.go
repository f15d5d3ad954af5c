//go:build rbd

package rbd

import (
	"fmt"

	librbd "github.com/ceph/go-ceph/rbd"
)

// Extents lists the allocated ranges within [from, to) with rbd_diff_iterate2 against no
// snapshot, at object granularity (fast with the object-map and fast-diff features, which
// Create enables); ranges are merged when adjacent.
func (s *Store) Extents(from, to int64) ([][2]int64, error) {
	s.mu.RLock()
	defer s.mu.RUnlock()
	to = min(to, s.size)
	if from >= to {
		return nil, nil
	}
	var out [][2]int64
	err := s.img.DiffIterate(diffConfig(uint64(from), uint64(to-from), func(off, n uint64, exists int) {
		if exists == 0 {
			return
		}
		e := [2]int64{max(int64(off), from), min(int64(off+n), to)}
		if k := len(out); k > 0 && out[k-1][1] >= e[0] {
			out[k-1][1] = max(out[k-1][1], e[1])
			return
		}
		out = append(out, e)
	}))
	if err != nil {
		return nil, fmt.Errorf("failed to map %s: %w", s.loc, err)
	}
	return out, nil
}

// diffConfig asks for the allocated objects of [off, off+n) against no snapshot.
func diffConfig(off, n uint64, fn func(off, n uint64, exists int)) librbd.DiffIterateConfig {
	return librbd.DiffIterateConfig{
		SnapName: librbd.NoSnapshot, Offset: off, Length: n,
		IncludeParent: librbd.IncludeParent, WholeObject: librbd.EnableWholeObject,
		Callback: func(off, n uint64, exists int, _ interface{}) int { fn(off, n, exists); return 0 },
	}
}
