package format

// The integrity tree's geometry (version 2, FORMAT.md §7): one leaf per 4 KiB metadata page,
// nodes of TreeArity 32-byte child digests (4 KiB), level 1 over the leaves, up to one top
// node whose digest is the root. Nodes are stored level by level from tree_offset.

const (
	MetaPageSize = 4096
	TreeArity    = 128
	TreeNodeSize = TreeArity * 32
)

// MetaPages is the number of metadata pages of a disk of n sectors.
func MetaPages(sectors uint64) uint64 {
	return (sectors*MetaEntrySize + MetaPageSize - 1) / MetaPageSize
}

// TreeLevels returns the node count of each level from 1 (over the leaves) to the top (one
// node), for a tree over pages leaves (≥ 1).
func TreeLevels(pages uint64) []uint64 {
	var ls []uint64
	n := max(pages, 1)
	for {
		n = (n + TreeArity - 1) / TreeArity
		ls = append(ls, n)
		if n == 1 {
			return ls
		}
	}
}

// TreeRegionSize is the tree region's size: every node, aligned up to 1 MiB.
func TreeRegionSize(pages uint64) uint64 {
	var nodes uint64
	for _, n := range TreeLevels(pages) {
		nodes += n
	}
	return align(nodes*TreeNodeSize, RegionAlign)
}

// TreeNodePos is the file offset of node index at level (1-based) in h's tree region.
func (h *Header) TreeNodePos(level int, index uint64) int64 {
	ls := TreeLevels(h.Pages())
	if level < 1 || level > len(ls) || index >= ls[level-1] {
		panic("BUG: format: tree node outside the tree")
	}
	n := index
	for _, c := range ls[:level-1] {
		n += c
	}
	return int64(h.TreeOffset + n*TreeNodeSize)
}
