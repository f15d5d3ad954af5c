package tests

import (
	"bufio"
	"bytes"
	"fmt"
	"io"
	"io/fs"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strings"
	"testing"
)

// initramfs is the file tree of a guest's initramfs, written as a cpio "newc" archive (what
// the kernel unpacks into its rootfs; uncompressed, which every kernel takes).
type initramfs struct {
	files map[string]initramfsEntry // path inside the archive (no leading /) -> entry
}

type initramfsEntry struct {
	mode fs.FileMode // type bits and permissions
	data []byte      // file contents, or a symlink's target
}

func newInitramfs() *initramfs { return &initramfs{files: map[string]initramfsEntry{}} }

// dirs adds path's parent directories.
func (r *initramfs) dirs(path string) {
	for d := filepath.Dir(path); d != "." && d != "/"; d = filepath.Dir(d) {
		if _, ok := r.files[d]; !ok {
			r.files[d] = initramfsEntry{mode: fs.ModeDir | 0o755}
		}
	}
}

func (r *initramfs) add(path string, mode fs.FileMode, data []byte) {
	path = strings.TrimPrefix(path, "/")
	r.dirs(path)
	r.files[path] = initramfsEntry{mode: mode, data: data}
}

func (r *initramfs) dir(path string) { r.add(path, fs.ModeDir|0o755, nil) }

func (r *initramfs) symlink(path, target string) { r.add(path, fs.ModeSymlink|0o777, []byte(target)) }

// copyFile adds the host file src (symlinks followed) at dst, keeping its permissions.
func (r *initramfs) copyFile(t *testing.T, src, dst string) {
	t.Helper()
	b, err := os.ReadFile(src)
	if err != nil {
		t.Fatal(err)
	}
	fi, err := os.Stat(src)
	if err != nil {
		t.Fatal(err)
	}
	r.add(dst, fi.Mode().Perm(), b)
}

// copyBinary adds the host executable src at dst with every shared library ldd names and the
// dynamic loader, each at its host path.
func (r *initramfs) copyBinary(t *testing.T, src, dst string) {
	t.Helper()
	r.copyFile(t, src, dst)
	out, err := exec.Command("ldd", src).CombinedOutput()
	if err != nil {
		if strings.Contains(string(out), "not a dynamic executable") {
			return
		}
		t.Fatalf("ldd %s: %v\n%s", src, err, out)
	}
	sc := bufio.NewScanner(bytes.NewReader(out))
	for sc.Scan() {
		// "libc.so.6 => /lib/x86_64-linux-gnu/libc.so.6 (0x…)" or "/lib64/ld-linux-x86-64.so.2 (0x…)"
		var lib string
		for _, f := range strings.Fields(sc.Text()) {
			if strings.HasPrefix(f, "/") {
				lib = f
				break
			}
		}
		if lib == "" {
			continue // linux-vdso.so.1
		}
		if _, ok := r.files[strings.TrimPrefix(lib, "/")]; !ok {
			r.copyFile(t, lib, lib)
		}
	}
}

// addModules adds the kernel modules names (with the modules they depend on, by modinfo's
// depends field, decompressed when the kernel ships them .xz or .zst) under lib/modules/, and
// returns their file names in an order insmod can load them.
func (r *initramfs) addModules(t *testing.T, kver string, names ...string) []string {
	t.Helper()
	var order []string
	seen := map[string]bool{}
	var visit func(name string)
	visit = func(name string) {
		name = strings.ReplaceAll(name, "-", "_")
		if seen[name] {
			return
		}
		seen[name] = true
		out, err := exec.Command("modinfo", "-k", kver, "-F", "filename", name).Output()
		if err != nil {
			t.Fatalf("modinfo -k %s %s: %v (linux-image-amd64's modules missing?)", kver, name, err)
		}
		path := strings.TrimSpace(string(out))
		out, err = exec.Command("modinfo", "-F", "depends", path).Output()
		if err != nil {
			t.Fatalf("modinfo -F depends %s: %v", path, err)
		}
		for _, dep := range strings.Split(strings.TrimSpace(string(out)), ",") {
			if dep != "" {
				visit(dep)
			}
		}
		var ko []byte
		switch {
		case strings.HasSuffix(path, ".ko.xz"):
			ko, err = exec.Command("xz", "-dc", path).Output()
		case strings.HasSuffix(path, ".ko.zst"):
			ko, err = exec.Command("zstd", "-dc", path).Output()
		case strings.HasSuffix(path, ".ko.gz"):
			ko, err = exec.Command("gzip", "-dc", path).Output()
		default:
			ko, err = os.ReadFile(path)
		}
		if err != nil {
			t.Fatalf("reading module %s: %v", path, err)
		}
		file := name + ".ko"
		r.add("lib/modules/"+file, 0o644, ko)
		order = append(order, file)
	}
	for _, n := range names {
		visit(n)
	}
	return order
}

// write writes the archive: cpio newc, directories before what they hold, then the trailer.
func (r *initramfs) write(w io.Writer) error {
	paths := make([]string, 0, len(r.files))
	for p := range r.files {
		paths = append(paths, p)
	}
	slices.Sort(paths) // a parent sorts before its children
	bw := bufio.NewWriter(w)
	ino := 1
	entry := func(name string, mode uint32, data []byte) {
		nlink := 1
		if mode&0o170000 == 0o040000 {
			nlink = 2
		}
		fmt.Fprintf(bw, "070701%08X%08X%08X%08X%08X%08X%08X%08X%08X%08X%08X%08X%08X",
			ino, mode, 0, 0, nlink, 0, len(data), 0, 0, 0, 0, len(name)+1, 0)
		ino++
		bw.WriteString(name)
		bw.WriteByte(0)
		pad(bw, 110+len(name)+1)
		bw.Write(data)
		pad(bw, len(data))
	}
	for _, p := range paths {
		e := r.files[p]
		mode := uint32(e.mode.Perm())
		switch {
		case e.mode.IsDir():
			mode |= 0o040000
		case e.mode&fs.ModeSymlink != 0:
			mode |= 0o120000
		default:
			mode |= 0o100000
		}
		entry(p, mode, e.data)
	}
	entry("TRAILER!!!", 0, nil)
	return bw.Flush()
}

// pad writes zeros up to the next multiple of 4 after n bytes.
func pad(w *bufio.Writer, n int) {
	for ; n%4 != 0; n++ {
		w.WriteByte(0)
	}
}
