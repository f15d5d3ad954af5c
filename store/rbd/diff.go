//go:build rbd

package rbd

import librbd "github.com/ceph/go-ceph/rbd"

func diffConfig(off, n uint64, fn func(off, n uint64, exists int)) librbd.DiffIterateConfig {
	return librbd.DiffIterateConfig{
		SnapName: librbd.NoSnapshot, Offset: off, Length: n,
		IncludeParent: librbd.IncludeParent, WholeObject: librbd.EnableWholeObject,
		Callback: func(off, n uint64, exists int, _ interface{}) int { fn(off, n, exists); return 0 },
	}
}
