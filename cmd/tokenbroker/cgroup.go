package main

import (
	"bufio"
	"io/fs"
	"path"
	"strconv"
	"strings"
)

// cgroupMemoryLimit returns the memory limit of the process's cgroup, read
// from fsys (the root file system: os.DirFS("/")), and whether there is
// one. cgroup v2 is read first (memory.max), then v1
// (memory.limit_in_bytes); for each, the process's own cgroup as
// /proc/self/cgroup names it, then the mount's root, which is the
// process's cgroup inside a container with its own cgroup namespace.
func cgroupMemoryLimit(fsys fs.FS) (uint64, bool) {
	v2, v1 := "/", "/"
	if f, err := fsys.Open("proc/self/cgroup"); err == nil {
		sc := bufio.NewScanner(f)
		for sc.Scan() {
			// hierarchy-ID:controller-list:cgroup-path
			parts := strings.SplitN(sc.Text(), ":", 3)
			if len(parts) != 3 {
				continue
			}
			switch {
			case parts[0] == "0" && parts[1] == "":
				v2 = parts[2]
			case containsWord(parts[1], "memory"):
				v1 = parts[2]
			}
		}
		f.Close()
	}
	for _, file := range []string{
		path.Join("sys/fs/cgroup", v2, "memory.max"),
		"sys/fs/cgroup/memory.max",
		path.Join("sys/fs/cgroup/memory", v1, "memory.limit_in_bytes"),
		"sys/fs/cgroup/memory/memory.limit_in_bytes",
	} {
		b, err := fs.ReadFile(fsys, file)
		if err != nil {
			continue
		}
		s := strings.TrimSpace(string(b))
		if s == "max" {
			return 0, false
		}
		n, err := strconv.ParseUint(s, 10, 64)
		if err != nil {
			continue
		}
		// v1 writes "no limit" as the largest page-aligned int64.
		if n >= 1<<62 {
			return 0, false
		}
		return n, true
	}
	return 0, false
}

func containsWord(list, word string) bool {
	for w := range strings.SplitSeq(list, ",") {
		if w == word {
			return true
		}
	}
	return false
}

// heapFloorFor returns the heap floor to keep under a memory limit: at
// most a quarter of it, so that the heap left to grow before the collector
// runs stays well inside what the process may use. With no limit, floor.
func heapFloorFor(floor, limit uint64, limited bool) uint64 {
	if limited {
		return min(floor, limit/4)
	}
	return floor
}
