package gcfloor

import (
	"runtime"
	"runtime/debug"
	"runtime/metrics"
	"testing"
	"time"
)

// withGOGC runs the test at GOGC=percent and restores the setting after.
func withGOGC(t *testing.T, percent int) {
	prev := debug.SetGCPercent(percent)
	t.Cleanup(func() { debug.SetGCPercent(prev) })
}

// startTestFloor starts a floor whose tunes arrive on the returned channel,
// the first (at start) already taken.
func startTestFloor(t *testing.T, floor uint64) (*Floor, <-chan int) {
	tuned := make(chan int, 64)
	h := start(floor, func(p int) {
		select {
		case tuned <- p:
		default:
		}
	})
	t.Cleanup(h.Stop)
	<-tuned
	return h, tuned
}

// collect runs a collection and returns the percent the floor set after it.
func collect(t *testing.T, tuned <-chan int) int {
	t.Helper()
drain: // tunes from collections before this one
	for {
		select {
		case <-tuned:
		default:
			break drain
		}
	}
	runtime.GC()
	select {
	case p := <-tuned:
		return p
	case <-time.After(10 * time.Second):
		t.Fatal("GOGC was not tuned after a collection")
		return 0
	}
}

func readMetric(name string) uint64 {
	s := []metrics.Sample{{Name: name}}
	metrics.Read(s)
	return s[0].Value.Uint64()
}

func TestFloorPutsTheHeapGoalAtTheFloor(t *testing.T) {
	withGOGC(t, 100)
	const floor = 64 << 20
	runtime.GC()
	if g := readMetric("/gc/heap/goal:bytes"); g > floor/4 {
		// The floor could not be told apart from GOGC's own goal.
		t.Fatalf("precondition: the test binary's heap goal is already %d bytes without a floor", g)
	}
	_, tuned := startTestFloor(t, floor)
	for range 3 { // it holds collection after collection
		p := collect(t, tuned)
		goal := readMetric("/gc/heap/goal:bytes")
		if goal < floor*95/100 || goal > floor*105/100 {
			t.Fatalf("GOGC=%d: heap goal %d bytes, want the floor, %d", p, goal, floor)
		}
	}
}

var sink []byte

func TestFloorLeavesGOGCAloneAboveTheFloor(t *testing.T) {
	withGOGC(t, 100)
	live := make([]byte, 32<<20)
	_, tuned := startTestFloor(t, 8<<20)
	if p := collect(t, tuned); p != 100 {
		t.Fatalf("with 32 MiB live and an 8 MiB floor GOGC was set to %d, want 100 (unchanged)", p)
	}
	runtime.KeepAlive(live)
}

func TestFloorCutsCollections(t *testing.T) {
	withGOGC(t, 100)
	// churn allocates 256 MiB of short-lived garbage and counts the
	// collections it took.
	churn := func() uint64 {
		before := readMetric("/gc/cycles/total:gc-cycles")
		for range 64 << 10 {
			sink = make([]byte, 4<<10)
		}
		return readMetric("/gc/cycles/total:gc-cycles") - before
	}
	runtime.GC()
	without := churn()
	h, tuned := startTestFloor(t, 64<<20)
	collect(t, tuned)
	with := churn()
	t.Logf("collections for 256 MiB of garbage: %d without a floor, %d with a 64 MiB floor", without, with)
	if with*4 > without {
		t.Fatalf("a 64 MiB floor left %d collections of %d", with, without)
	}
	h.Stop()
	if p := debug.SetGCPercent(100); p != 100 {
		t.Fatalf("Stop left GOGC at %d, want 100 restored", p)
	}
}

func TestFloorLeavesGOGCOffAlone(t *testing.T) {
	withGOGC(t, -1)
	h := Start(64 << 20)
	defer h.Stop()
	if p := debug.SetGCPercent(-1); p != -1 {
		t.Fatalf("with GOGC=off the floor set GOGC=%d", p)
	}
	if !h.stopped.Load() {
		t.Fatal("with GOGC=off the floor is tuning")
	}
}
