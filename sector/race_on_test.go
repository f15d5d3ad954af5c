//go:build race

package sector

// raceEnabled: the race detector is on; sync.Pool then drops items at random, so pooled
// buffers allocate and allocation counts are meaningless.
const raceEnabled = true
