//go:build race

package engine

// raceEnabled: the race detector is on; its shadow memory makes resident-memory figures
// meaningless, so memory-bound tests skip.
const raceEnabled = true
