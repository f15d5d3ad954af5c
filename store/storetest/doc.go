// Package storetest holds the test doubles of package store, kept out of its production API
// (as pebble keeps vfs/errorfs beside vfs): Mem, a sparse in-memory store; Crash, a store that
// simulates a crash at the atomic units of FORMAT.md §6; ErrStore, which fails the operations
// its Injector picks; Exercise, the model check every Store passes; and StartLockProcess,
// another process holding an image lock.
package storetest
