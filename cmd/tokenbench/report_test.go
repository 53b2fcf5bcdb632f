package main

import (
	"context"
	"errors"
	"io"
	"testing"
)

// verdicts evaluates targets and returns each one's verdict by name.
func verdicts(t *testing.T, targets []Target) map[string]bool {
	t.Helper()
	out := map[string]bool{}
	for _, e := range evaluate(targets) {
		out[e.Name] = e.Met
	}
	return out
}

func TestEvaluateBothSidesOfEachEdge(t *testing.T) {
	for _, c := range []struct {
		name string
		t    Target
		met  bool
	}{
		{"at least, at the factor", Target{Measured: 970, Op: "at least", Baseline: 1000, Factor: 0.97}, true},
		{"at least, just under", Target{Measured: 969.9, Op: "at least", Baseline: 1000, Factor: 0.97}, false},
		{"at most, at the factor", Target{Measured: 105, Op: "at most", Baseline: 100, Factor: 1.05}, true},
		{"at most, just over", Target{Measured: 105.01, Op: "at most", Baseline: 100, Factor: 1.05}, false},
		{"at most a limit, at it", Target{Measured: 2, Op: "at most", Limit: 2}, true},
		{"at most a limit, over", Target{Measured: 2.001, Op: "at most", Limit: 2}, false},
		{"exactly, equal", Target{Measured: 6, Op: "exactly", Limit: 6}, true},
		{"exactly, one short", Target{Measured: 5, Op: "exactly", Limit: 6}, false},
		{"exactly, one over", Target{Measured: 7, Op: "exactly", Limit: 6}, false},
		{"relative without a baseline", Target{Measured: 1, Op: "at least", Baseline: 0, Factor: 0.97}, false},
		{"unknown comparison", Target{Measured: 1, Op: "below", Limit: 2}, false},
	} {
		got := evaluate([]Target{c.t})[0]
		if got.Met != c.met {
			t.Errorf("%s: met %v, want %v (%+v)", c.name, got.Met, c.met, got)
		}
	}
	got := evaluate([]Target{{Measured: 970, Op: "at least", Baseline: 1000, Factor: 0.97}, {Measured: 1, Op: "at most", Limit: 4}})
	if got[0].Limit != 1000*0.97 || got[0].Ratio != 0.97 || got[1].Ratio != 0.25 {
		t.Errorf("limits and ratios: %+v", got)
	}
	if missed(got) != 0 || missed(evaluate([]Target{{Measured: 5, Op: "at most", Limit: 4}})) != 1 {
		t.Error("missed does not count the targets not met")
	}
}

// The cached targets: throughput at least 0.97x and p99 at most 1.05x the
// echo's, at every level and over both transports; the no-op ratio is a
// note, not a verdict.
func TestCachedTargetsAgainstTheEcho(t *testing.T) {
	point := func(callers int, tput, p99 float64) CachedPoint {
		return CachedPoint{Callers: callers, Noop: Load{PerSecond: 2000, P99US: 50},
			Echo: Load{PerSecond: 1000, P99US: 100}, Token: Load{PerSecond: 1000 * tput, P99US: 100 * p99}}
	}
	c := &CachedResult{Plaintext: []CachedPoint{point(1, 0.97, 1.05), point(16, 0.969, 1.051)}, MutualTLS: []CachedPoint{point(1, 1, 1)}}
	want := map[string]bool{
		"throughput vs echo, concurrency 1, plaintext": true, "p99 vs echo, concurrency 1, plaintext": true,
		"throughput vs echo, concurrency 16, plaintext": false, "p99 vs echo, concurrency 16, plaintext": false,
		"throughput vs echo, concurrency 1, mutual TLS": true, "p99 vs echo, concurrency 1, mutual TLS": true,
	}
	got := verdicts(t, c.targets())
	for name, met := range want {
		if m, ok := got[name]; !ok || m != met {
			t.Errorf("%s: met %v (present %v), want %v", name, m, ok, met)
		}
	}
	if len(got) != len(want) {
		t.Errorf("targets %v, want %v", got, want)
	}
}

// The parked herd over its baseline may take the upstream latency, one
// commit and 10 ms; every herd of every size must make one upstream call.
func TestHerdTargets(t *testing.T) {
	herd := func(parked float64, calls ...int) []*HerdResult {
		small := &HerdResult{Callers: 10, UpstreamCalls: []int{1, 1}}
		return []*HerdResult{small, {Callers: 100, LatencyMS: 50, CommitMS: 1, ParkedMS: parked, ParkedNoopMS: 20, UpstreamCalls: calls}}
	}
	for _, c := range []struct {
		parked       float64
		calls        []int
		time, calls1 bool
	}{
		{20 + 61, []int{1, 1}, true, true},
		{20 + 61.5, []int{1, 1}, false, true},
		{20, []int{1, 2}, true, false},
		{20, []int{0, 1}, true, false},
	} {
		got := evaluate(herdTargets(herd(c.parked, c.calls...)))
		if got[0].Met != c.calls1 || got[1].Met != c.time {
			t.Errorf("parked %v ms, calls %v: %+v", c.parked, c.calls, got)
		}
	}
}

func TestExpiryAndScaleTargets(t *testing.T) {
	e := &ExpiryResult{Conns: 10, Upstream: 10}
	if v := evaluate(e.targets()); missed(v) != 0 {
		t.Errorf("expiry at its target: %+v", v)
	}
	for _, n := range []int{9, 11} {
		if e.Upstream = n; missed(evaluate(e.targets())) != 1 {
			t.Errorf("%d upstream requests for 10 connections met its target", n)
		}
	}
	s := &ScaleResult{Conns: 100000, WarmMS: 500, ColdMS: 1000, RSSMB: 300, ServedMB: 300, CommitP99MS: 2}
	if v := evaluate(s.targets()); missed(v) != 0 || len(v) != 5 {
		t.Errorf("scale at its limits: %+v", v)
	}
	s = &ScaleResult{Conns: 100000, WarmMS: 501, ColdMS: 1001, RSSMB: 301, ServedMB: 301, CommitP99MS: 2.01}
	if v := evaluate(s.targets()); missed(v) != 5 {
		t.Errorf("scale past its limits: %+v", v)
	}
	if v := (&ScaleResult{Conns: 1000, WarmMS: 1e6}).targets(); len(v) != 0 {
		t.Errorf("targets below 100k connections: %+v", v)
	}
}

// Every section's fields exist in the template: rendering a full result
// fails on a name the template uses that the results lack.
func TestRenderAFullResult(t *testing.T) {
	p := CachedPoint{Callers: 1, Noop: Load{PerSecond: 1, P99US: 1}, Echo: Load{PerSecond: 1, P99US: 1}, Token: Load{PerSecond: 1, P99US: 1}}
	r := &Results{Cached: &CachedResult{Plaintext: []CachedPoint{p}, MutualTLS: []CachedPoint{p}},
		Herd: []*HerdResult{{Callers: 1}}, Expiry: &ExpiryResult{},
		Scale: []*ScaleResult{{Conns: 100000}}, Etcd: &EtcdResult{}}
	r.Targets = evaluate(append(r.Cached.targets(), r.Scale[0].targets()...))
	if err := render(io.Discard, r); err != nil {
		t.Fatal(err)
	}
}

// TestMedianTakesEachFigureOnItsOwn: one run's outlier in one figure does
// not pick the others.
func TestMedianTakesEachFigureOnItsOwn(t *testing.T) {
	runs := []Load{
		{Calls: 10, PerSecond: 300, P50US: 1, P99US: 90, CPUUS: 7, Errors: 1},
		{Calls: 20, PerSecond: 100, P50US: 3, P99US: 10, CPUUS: 5},
		{Calls: 30, PerSecond: 200, P50US: 2, P99US: 50, CPUUS: 9},
	}
	if got, want := median(runs), (Load{Calls: 60, Errors: 1, PerSecond: 200, P50US: 2, P99US: 50, CPUUS: 7}); got != want {
		t.Errorf("median %+v, want %+v", got, want)
	}
}

// TestRunLoadCountsFailures: a failed call is counted, so that benchCached
// can refuse a mode whose calls fail (they are fast).
func TestRunLoadCountsFailures(t *testing.T) {
	var n int
	r := runLoad(1, 50e6, func(context.Context, int) error {
		if n++; n%2 == 0 {
			return errors.New("refused")
		}
		return nil
	})
	if r.Calls != n || r.Errors != n/2 || r.Calls < 2 {
		t.Errorf("%d calls made, %d failed; result %+v", n, n/2, r)
	}
}
