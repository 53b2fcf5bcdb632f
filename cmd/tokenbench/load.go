package main

import (
	"context"
	"slices"
	"sync"
	"syscall"
	"time"
)

// loadResult is one measured run of a closed-loop load.
type loadResult struct {
	calls      int
	errors     int
	throughput float64 // calls per second
	p50, p99   time.Duration
	// cpu is the process's CPU time (user and system) per call: client
	// and server together, as both run in the bench process.
	cpu time.Duration
}

// processCPU is the CPU time the process has used so far.
func processCPU() time.Duration {
	var ru syscall.Rusage
	if err := syscall.Getrusage(syscall.RUSAGE_SELF, &ru); err != nil {
		return 0
	}
	return time.Duration(ru.Utime.Nano() + ru.Stime.Nano())
}

// runLoad runs conc goroutines calling call back to back for dur and
// reports throughput and latency percentiles.
func runLoad(conc int, dur time.Duration, call func(ctx context.Context, worker int) error) loadResult {
	ctx := context.Background()
	lat := make([][]time.Duration, conc)
	errs := make([]int, conc)
	var wg sync.WaitGroup
	start := make(chan struct{})
	var deadline time.Time
	for w := range conc {
		lat[w] = make([]time.Duration, 0, 4096)
		wg.Add(1)
		go func() {
			defer wg.Done()
			<-start
			for {
				t0 := time.Now()
				if t0.After(deadline) {
					return
				}
				if err := call(ctx, w); err != nil {
					errs[w]++
				}
				lat[w] = append(lat[w], time.Since(t0))
			}
		}()
	}
	cpu0, began := processCPU(), time.Now()
	deadline = began.Add(dur)
	close(start)
	wg.Wait()
	elapsed, cpu := time.Since(began), processCPU()-cpu0
	var all []time.Duration
	r := loadResult{}
	for w := range conc {
		all = append(all, lat[w]...)
		r.errors += errs[w]
	}
	slices.Sort(all)
	r.calls = len(all)
	r.throughput = float64(len(all)) / elapsed.Seconds()
	if len(all) > 0 {
		r.cpu = cpu / time.Duration(len(all))
		r.p50 = all[len(all)*50/100]
		r.p99 = all[min(len(all)*99/100, len(all)-1)]
	}
	return r
}

// median returns the median throughput, p50, p99 and CPU per call, each
// taken separately.
func median(runs []loadResult) loadResult {
	pick := func(key func(loadResult) float64) float64 {
		v := make([]float64, len(runs))
		for i, r := range runs {
			v[i] = key(r)
		}
		slices.Sort(v)
		return v[len(v)/2]
	}
	out := loadResult{
		throughput: pick(func(r loadResult) float64 { return r.throughput }),
		p50:        time.Duration(pick(func(r loadResult) float64 { return float64(r.p50) })),
		p99:        time.Duration(pick(func(r loadResult) float64 { return float64(r.p99) })),
		cpu:        time.Duration(pick(func(r loadResult) float64 { return float64(r.cpu) })),
	}
	for _, r := range runs {
		out.calls += r.calls
		out.errors += r.errors
	}
	return out
}
