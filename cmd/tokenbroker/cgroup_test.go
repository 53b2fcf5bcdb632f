package main

import (
	"testing"
	"testing/fstest"
)

func TestCgroupMemoryLimit(t *testing.T) {
	file := func(s string) *fstest.MapFile { return &fstest.MapFile{Data: []byte(s)} }
	for _, tc := range []struct {
		name    string
		fsys    fstest.MapFS
		want    uint64
		limited bool
	}{
		{"v2, own cgroup", fstest.MapFS{
			"proc/self/cgroup":                           file("0::/kubepods/pod1/ctr\n"),
			"sys/fs/cgroup/kubepods/pod1/ctr/memory.max": file("536870912\n"),
			"sys/fs/cgroup/memory.max":                   file("max\n"),
		}, 512 << 20, true},
		{"v2, namespace root", fstest.MapFS{
			"proc/self/cgroup":         file("0::/\n"),
			"sys/fs/cgroup/memory.max": file("268435456\n"),
		}, 256 << 20, true},
		{"v2, no limit", fstest.MapFS{
			"proc/self/cgroup":         file("0::/\n"),
			"sys/fs/cgroup/memory.max": file("max\n"),
		}, 0, false},
		{"v1 hybrid, own cgroup", fstest.MapFS{
			"proc/self/cgroup": file("9:name=systemd:/\n4:memory:/svc/a\n0::/\n"),
			"sys/fs/cgroup/memory/svc/a/memory.limit_in_bytes": file("134217728\n"),
			"sys/fs/cgroup/memory/memory.limit_in_bytes":       file("9223372036854771712\n"),
		}, 128 << 20, true},
		{"v1, no limit", fstest.MapFS{
			"proc/self/cgroup":                           file("4:cpu,memory:/\n"),
			"sys/fs/cgroup/memory/memory.limit_in_bytes": file("9223372036854771712\n"),
		}, 0, false},
		{"v1, joint controllers", fstest.MapFS{
			"proc/self/cgroup": file("4:memory,cpu:/x\n"),
			"sys/fs/cgroup/memory/x/memory.limit_in_bytes": file("1073741824\n"),
		}, 1 << 30, true},
		{"no cgroup files", fstest.MapFS{}, 0, false},
		{"unreadable value", fstest.MapFS{
			"proc/self/cgroup":         file("0::/\n"),
			"sys/fs/cgroup/memory.max": file("lots\n"),
		}, 0, false},
	} {
		got, limited := cgroupMemoryLimit(tc.fsys)
		if got != tc.want || limited != tc.limited {
			t.Errorf("%s: got %d, %v; want %d, %v", tc.name, got, limited, tc.want, tc.limited)
		}
	}
}

func TestHeapFloorForALimit(t *testing.T) {
	const floor = 64 << 20
	for _, tc := range []struct {
		limit   uint64
		limited bool
		want    uint64
	}{
		{0, false, floor},
		{512 << 20, true, floor},
		{256 << 20, true, floor},
		{128 << 20, true, 32 << 20},
		{64 << 20, true, 16 << 20},
	} {
		if got := heapFloorFor(floor, tc.limit, tc.limited); got != tc.want {
			t.Errorf("limit %d (%v): floor %d, want %d", tc.limit, tc.limited, got, tc.want)
		}
	}
}
