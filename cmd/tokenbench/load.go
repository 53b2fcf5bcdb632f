package main

import (
	"context"
	"slices"
	"sync"
	"syscall"
	"time"
)

// Load is one closed-loop load, or the median of several runs of it.
type Load struct {
	Calls, Errors int
	PerSecond     float64
	P50US, P99US  float64
	// CPUUS is the process's CPU time (user and system) per call: client
	// and server together, as both run in the bench process.
	CPUUS float64
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
// reports throughput, latency percentiles and CPU per call.
func runLoad(conc int, dur time.Duration, call func(ctx context.Context, worker int) error) Load {
	ctx := context.Background()
	lat := make([][]time.Duration, conc)
	errs := make([]int, conc)
	var wg sync.WaitGroup
	start := make(chan struct{})
	var deadline time.Time
	for w := range conc {
		lat[w] = make([]time.Duration, 0, 4096)
		wg.Go(func() {
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
		})
	}
	cpu0, began := processCPU(), time.Now()
	deadline = began.Add(dur)
	close(start)
	wg.Wait()
	elapsed, cpu := time.Since(began), processCPU()-cpu0
	all := slices.Concat(lat...)
	r := Load{Calls: len(all)}
	for _, e := range errs {
		r.Errors += e
	}
	r.PerSecond = float64(len(all)) / elapsed.Seconds()
	if len(all) > 0 {
		p50, p99 := percentiles(all)
		r.CPUUS, r.P50US, r.P99US = us(cpu/time.Duration(len(all))), us(p50), us(p99)
	}
	return r
}

// median returns the median throughput, p50, p99 and CPU per call, each
// taken on its own, and the calls and errors of every run.
func median(runs []Load) Load {
	pick := func(key func(Load) float64) float64 {
		v := make([]float64, len(runs))
		for i, r := range runs {
			v[i] = key(r)
		}
		slices.Sort(v)
		return v[len(v)/2]
	}
	out := Load{
		PerSecond: pick(func(r Load) float64 { return r.PerSecond }),
		P50US:     pick(func(r Load) float64 { return r.P50US }),
		P99US:     pick(func(r Load) float64 { return r.P99US }),
		CPUUS:     pick(func(r Load) float64 { return r.CPUUS }),
	}
	for _, r := range runs {
		out.Calls += r.Calls
		out.Errors += r.Errors
	}
	return out
}
