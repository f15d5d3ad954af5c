package main

import (
	"bytes"
	"strings"
	"testing"
)

// TestRootHelpNamesEveryCommand: the root --help's description names every top-level command,
// so it cannot go stale again as commands are added (it once said the binary held only the
// offline tools, long after serve existed).
func TestRootHelpNamesEveryCommand(t *testing.T) {
	root := newRoot()
	var out bytes.Buffer
	root.SetOut(&out)
	root.SetArgs([]string{"--help"})
	if err := root.Execute(); err != nil {
		t.Fatal(err)
	}
	desc, _, _ := strings.Cut(out.String(), "Usage:")
	for _, c := range root.Commands() {
		name := c.Name()
		if name == "help" || name == "completion" || name == "version" || c.Hidden {
			continue
		}
		if !strings.Contains(desc, name) {
			t.Errorf("root --help's description does not mention %q:\n%s", name, desc)
		}
	}
}
