// Package gcfloor keeps a floor under the Go heap: the garbage collector
// does not run until the heap reaches it, and above it GOGC applies as
// usual. tokenbroker serve keeps one (--gc-heap-floor-mib), and so does the
// benchmark command, whose in-process servers stand for it.
package gcfloor

import (
	"math"
	"runtime"
	"runtime/debug"
	"runtime/metrics"
	"sync"
	"sync/atomic"
)

// Floor lets the heap grow to a floor before the garbage collector
// runs; above the floor, GOGC applies as usual.
//
// The broker's live heap is small until it holds many connections, while
// every call allocates short-lived garbage (gRPC's own buffers and frames
// are most of it). Under GOGC alone the runtime then collects whenever the
// heap has doubled from a few megabytes: scores of collections a second
// under load, and a large share of the CPU. The runtime has no minimum heap
// setting, so after each collection Floor raises GOGC just enough for
// the next collection to start at the floor, and never lowers it below
// where it was: the heap's goal is max(floor, what GOGC alone allows). A
// soft memory limit (GOMEMLIMIT) still wins over both, and with GOGC=off
// nothing is changed.
type Floor struct {
	floor   uint64
	base    int // GOGC when started, restored by Stop
	stopped atomic.Bool
	samples []metrics.Sample
	// onTune, when set (tests), is called with each percent set.
	onTune func(percent int)
}

// Default is the serve command's heap floor (--gc-heap-floor-mib).
const Default = 64 << 20

// floorMu serializes starting and stopping: GOGC is one setting per
// process.
var floorMu sync.Mutex

// Start starts keeping a heap floor of floor bytes, until Stop.
// Only one Floor may run at a time in a process.
func Start(floor uint64) *Floor {
	return start(floor, nil)
}

func start(floor uint64, onTune func(int)) *Floor {
	floorMu.Lock()
	defer floorMu.Unlock()
	h := &Floor{floor: floor, onTune: onTune, samples: []metrics.Sample{
		{Name: "/gc/heap/live:bytes"},
		{Name: "/gc/scan/stack:bytes"},
		{Name: "/gc/scan/globals:bytes"},
		{Name: "/memory/classes/heap/objects:bytes"},
	}}
	// SetGCPercent is the one way to read the setting that tells GOGC=off
	// apart.
	h.base = debug.SetGCPercent(100)
	debug.SetGCPercent(h.base)
	if h.base < 0 {
		// Collections happen only at the memory limit: left alone.
		h.stopped.Store(true)
		return h
	}
	h.tune()
	h.arm()
	return h
}

// Stop stops adjusting GOGC and restores its value from before the start.
func (h *Floor) Stop() {
	floorMu.Lock()
	defer floorMu.Unlock()
	if h.stopped.Swap(true) {
		return
	}
	debug.SetGCPercent(h.base)
}

// gcSentinel is allocated unreachable so that each collection finds it and
// runs its cleanup. It holds a pointer so that it is not batched with other
// small objects, which could keep it from being collected.
type gcSentinel struct{ _ *byte }

// arm has tune run after the next collection, and arm again then.
func (h *Floor) arm() {
	runtime.AddCleanup(new(gcSentinel), func(h *Floor) {
		floorMu.Lock()
		defer floorMu.Unlock()
		if h.stopped.Load() {
			return
		}
		h.tune()
		h.arm()
	}, h)
}

// runtimeHeapMinimum is the Go runtime's least heap goal at GOGC=100; it
// scales with GOGC.
const runtimeHeapMinimum = 4 << 20

// tune sets GOGC so that the next collection starts at the floor, from the
// heap the last collection found live. The runtime's goal at GOGC=p is the
// larger of live + (live + stacks + globals) * p/100 and its minimum heap,
// 4 MiB * p/100; the least p that brings either to the floor is the one.
func (h *Floor) tune() {
	metrics.Read(h.samples)
	live := h.samples[0].Value.Uint64()
	if live == 0 {
		// No collection yet: what is allocated now bounds what is live.
		live = h.samples[3].Value.Uint64()
	}
	roots := live + h.samples[1].Value.Uint64() + h.samples[2].Value.Uint64()
	percent := h.base
	if h.floor > live && roots > 0 {
		want := min(h.floor*100/runtimeHeapMinimum, (h.floor-live)*100/roots, math.MaxInt32)
		percent = max(percent, int(want))
	}
	debug.SetGCPercent(percent)
	if h.onTune != nil {
		h.onTune(percent)
	}
}
