package psp

// CachedKeys returns the key cache's own key buffers (not copies), so a test can see them
// zeroised after the cache lets go of them.
func CachedKeys(p *PSP) [][]byte {
	p.keys.mu.Lock()
	defer p.keys.mu.Unlock()
	var out [][]byte
	for _, es := range p.keys.entries {
		for _, e := range es {
			if e.rel != nil {
				out = append(out, e.rel.key)
			}
		}
	}
	return out
}
