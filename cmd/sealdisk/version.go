package main

import "runtime/debug"

// A binary built without the Makefile's -ldflags "-X main.version=$(git describe …)" (go build,
// go install) still says what it is: the module version go install recorded, else the commit
// the go command stamped into it (-buildvcs), with "-dirty" for uncommitted changes.
func init() {
	if version == "dev" {
		version = buildVersion()
	}
}

func buildVersion() string {
	bi, ok := debug.ReadBuildInfo()
	if !ok {
		return "dev"
	}
	if v := bi.Main.Version; v != "" && v != "(devel)" {
		return v
	}
	var rev, dirty string
	for _, s := range bi.Settings {
		switch s.Key {
		case "vcs.revision":
			rev = s.Value
		case "vcs.modified":
			if s.Value == "true" {
				dirty = "-dirty"
			}
		}
	}
	if rev == "" {
		return "dev"
	}
	if len(rev) > 12 {
		rev = rev[:12]
	}
	return rev + dirty
}
