package main

import (
	"context"
	"errors"
	"strings"
	"testing"
	"time"
)

// TestCachedVerdictsAtTheTargetsEdges checks the cached-path verdicts on
// both sides of each target, and that every miss is listed.
func TestCachedVerdictsAtTheTargetsEdges(t *testing.T) {
	point := func(conc int, tput, p99 float64) cachedPoint {
		return cachedPoint{conc: conc, tputRatio: tput, p99Ratio: p99,
			noop: loadResult{throughput: 1000, p99: time.Millisecond}, token: loadResult{throughput: 1000 * tput}}
	}
	r := &report{concs: []int{1, 16}, runs: 3, dur: time.Second, plot: "p.png",
		cached: []cachedPoint{point(1, 0.95, 1.1), point(16, 0.949, 1.101)}}
	md := r.markdown()
	// first returns the first row of the report starting with prefix: the
	// no-op table's.
	first := func(prefix string) string {
		for _, l := range strings.Split(md, "\n") {
			if strings.HasPrefix(l, prefix) {
				return l
			}
		}
		return ""
	}
	if l := first("| 1 | "); !strings.HasSuffix(l, "| met | met |") {
		t.Errorf("at the targets exactly, want both met: %q", l)
	}
	if l := first("| 16 | "); !strings.HasSuffix(l, "| **missed** | **missed** |") {
		t.Errorf("just past the targets, want both missed: %q", l)
	}
	want := []string{"cached throughput at 16 callers", "cached p99 at 16 callers"}
	if !r.failed() || strings.Join(r.misses, ";") != strings.Join(want, ";") {
		t.Errorf("misses %q, want %q", r.misses, want)
	}
	if !strings.Contains(md, "## Targets missed\n\n- cached throughput at 16 callers\n- cached p99 at 16 callers") {
		t.Errorf("the report does not list the misses:\n%s", md)
	}
}

func TestNothingMissedIsSaid(t *testing.T) {
	p := cachedPoint{conc: 1, tputRatio: 1, p99Ratio: 1}
	p.noop.cpu, p.echo.cpu, p.token.cpu = 30*time.Microsecond, 33*time.Microsecond, 32*time.Microsecond
	r := &report{cached: []cachedPoint{p}, cachedTLS: []cachedPoint{p}, runs: 1}
	md := r.markdown()
	if r.failed() || strings.Contains(md, "**missed**") {
		t.Errorf("a run that met its targets reads as failed:\n%s", md)
	}
	if !strings.Contains(md, "| 1 | 30.0 µs | 33.0 µs | 32.0 µs | +2.0 µs | -1.0 µs | 0.938 |") {
		t.Errorf("CPU per call row, with a saving over the echo, is not as expected:\n%s", md)
	}
	// fmt's complaints (%!d(MISSING), %!(EXTRA ...)) mean a line and its
	// arguments went apart.
	if strings.Contains(md, "%!") {
		t.Errorf("formatting errors in the report:\n%s", md)
	}
}

// TestMedianTakesEachFigureOnItsOwn: the median of runs is taken figure by
// figure, so one run's outlier in one figure does not pick the others.
func TestMedianTakesEachFigureOnItsOwn(t *testing.T) {
	runs := []loadResult{
		{calls: 10, throughput: 300, p50: 1, p99: 90, cpu: 7, errors: 1},
		{calls: 20, throughput: 100, p50: 3, p99: 10, cpu: 5},
		{calls: 30, throughput: 200, p50: 2, p99: 50, cpu: 9},
	}
	got := median(runs)
	want := loadResult{calls: 60, errors: 1, throughput: 200, p50: 2, p99: 50, cpu: 7}
	if got != want {
		t.Errorf("median %+v, want %+v", got, want)
	}
}

// TestRunLoadCountsFailures: a failed call is counted as an error, so that
// benchCached can refuse a mode whose calls fail (they are fast).
func TestRunLoadCountsFailures(t *testing.T) {
	var n int
	r := runLoad(1, 50*time.Millisecond, func(ctx context.Context, w int) error {
		n++
		if n%2 == 0 {
			return errors.New("refused")
		}
		return nil
	})
	if r.calls != n || r.errors != n/2 || r.calls < 2 {
		t.Errorf("%d calls made, %d failed; result %+v", n, n/2, r)
	}
}

// TestBareCarryingAgainstTheBudget: the bare server's table compares what
// carrying costs (bare echo over bare no-op, CPU per call) with 5.3% of the
// full stack's no-op, on both sides of the edge, and counts the levels over.
func TestBareCarryingAgainstTheBudget(t *testing.T) {
	point := func(conc int, carry time.Duration) cachedPoint {
		p := cachedPoint{conc: conc, tputRatio: 1, p99Ratio: 1, bareNoopRuns: []loadResult{{}}}
		p.noop.cpu = 38 * time.Microsecond // budget: 2.0 µs
		p.bareNoop = loadResult{throughput: 100, cpu: 20 * time.Microsecond}
		p.bareEcho = loadResult{throughput: 90, cpu: 20*time.Microsecond + carry}
		return p
	}
	r := &report{cached: []cachedPoint{point(1, 2*time.Microsecond), point(16, 2100*time.Nanosecond), {conc: 64}}, runs: 1}
	md := r.markdown()
	for _, want := range []string{
		"| 1 | 100 | 90 | 0.900 | 20.0 µs | 22.0 µs | +2.0 µs | 2.0 µs | yes |",
		"| 16 | 100 | 90 | 0.900 | 20.0 µs | 22.1 µs | +2.1 µs | 2.0 µs | no |",
		"Carrying alone exceeded the whole budget at 1 of 2 concurrency levels.",
	} {
		if !strings.Contains(md, want) {
			t.Errorf("report lacks %q:\n%s", want, md)
		}
	}
	if strings.Contains(md, "%!") {
		t.Errorf("formatting errors in the report:\n%s", md)
	}
	// Without bare runs (the mutual TLS table's points), no bare table.
	r = &report{cached: []cachedPoint{{conc: 1, tputRatio: 1, p99Ratio: 1}}, runs: 1}
	if md := r.markdown(); strings.Contains(md, "bare no-op") {
		t.Errorf("a bare table without bare runs:\n%s", md)
	}
}
