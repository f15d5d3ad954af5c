package main

import (
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/spf13/cobra"
)

// `sealdisk man DIR` (make man) writes a page for every command an operator can run, each
// with its own title and its command's description.
func TestManPageForEveryCommand(t *testing.T) {
	dir := t.TempDir()
	root := newRoot()
	root.SetArgs([]string{"man", dir})
	if err := root.Execute(); err != nil {
		t.Fatal(err)
	}
	n := 0
	var walk func(c *cobra.Command)
	walk = func(c *cobra.Command) {
		if !c.IsAvailableCommand() && c != root {
			return
		}
		name := strings.ReplaceAll(c.CommandPath(), " ", "-")
		page, err := os.ReadFile(filepath.Join(dir, name+".1"))
		if err != nil {
			t.Errorf("no man page for %q: %v", c.CommandPath(), err)
		} else if !strings.Contains(string(page), `.TH "`+strings.ToUpper(name)+`" "1"`) || !strings.Contains(string(page), "SYNOPSIS") {
			t.Errorf("%s.1 has no title or synopsis:\n%.300s", name, page)
		}
		n++
		for _, sub := range c.Commands() {
			walk(sub)
		}
	}
	walk(root)
	pages, _ := filepath.Glob(filepath.Join(dir, "*.1"))
	if n < 30 || len(pages) != n {
		t.Fatalf("%d commands, %d pages", n, len(pages))
	}
	serve, _ := os.ReadFile(filepath.Join(dir, "sealdisk-serve.1"))
	if !strings.Contains(string(serve), `\fB--nbd-listen\fP`) || !strings.Contains(string(serve), "SIGHUP") {
		t.Errorf("sealdisk-serve.1 lacks the serve flags or description")
	}
	if _, err := os.Stat(filepath.Join(dir, "sealdisk-man.1")); err == nil {
		t.Error("the hidden man command got a page")
	}
}
