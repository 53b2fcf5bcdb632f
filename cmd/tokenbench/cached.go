package main

import (
	"context"
	"fmt"
	"time"

	pb "tokenbroker/gen/tokenbroker/v1"

	"tokenbroker/server/servertest"
)

// CachedResult is cached GetAccessToken against the echo and no-op
// baselines on the same server stack, plaintext and over mutual TLS.
type CachedResult struct {
	Runs                 int
	Seconds              float64 // per run
	Plaintext, MutualTLS []CachedPoint
}

// CachedPoint is one concurrency level: the median of each mode's runs.
type CachedPoint struct {
	Callers           int
	Noop, Echo, Token Load
}

// Cached throughput and p99 against the echo.
const (
	cachedThroughputFactor = 0.97
	cachedP99Factor        = 1.05
)

func (c *CachedResult) targets() []Target {
	var ts []Target
	for _, set := range []struct {
		how    string
		points []CachedPoint
	}{{"plaintext", c.Plaintext}, {"mutual TLS", c.MutualTLS}} {
		for _, p := range set.points {
			note := fmt.Sprintf("vs no-op %.3f", p.Token.PerSecond/p.Noop.PerSecond)
			ts = append(ts, Target{Section: "cached", Name: fmt.Sprintf("throughput vs echo, concurrency %d, %s", p.Callers, set.how),
				Unit: "calls/s", Measured: p.Token.PerSecond, Op: "at least", Baseline: p.Echo.PerSecond, Factor: cachedThroughputFactor, Note: note},
				Target{Section: "cached", Name: fmt.Sprintf("p99 vs echo, concurrency %d, %s", p.Callers, set.how),
					Unit: "µs", Measured: p.Token.P99US, Op: "at most", Baseline: p.Echo.P99US, Factor: cachedP99Factor,
					Note: fmt.Sprintf("vs no-op %.3f", p.Token.P99US/p.Noop.P99US)})
		}
	}
	return ts
}

// benchCached measures cached GetAccessToken and the baselines on one
// server, plaintext or over mutual TLS with a policy: the modes
// interleaved, the one going first rotated, the median of runs per figure.
func benchCached(dir string, mtls bool, concs []int, runs int, dur time.Duration) []CachedPoint {
	s := newStack(stackOptions{dir: dir, now: time.Now, conns: 4, mtls: mtls})
	defer s.close()
	name := s.createConnections(1)[0]
	// Each mode builds its request per call and calls as a generated
	// client does (servertest's callers mirror it).
	type mode struct {
		name string
		call func(context.Context, int) error
	}
	modes := []mode{
		{"cached", func(ctx context.Context, w int) error {
			_, err := s.client(w).GetAccessToken(ctx, &pb.GetAccessTokenRequest{Name: name})
			return err
		}},
		{"noop", func(ctx context.Context, w int) error { return servertest.CallNoop(ctx, s.conns[w%len(s.conns)]) }},
		{"echo", func(ctx context.Context, w int) error {
			return servertest.CallEcho(ctx, s.conns[w%len(s.conns)], &pb.GetAccessTokenRequest{Name: name})
		}},
	}
	for _, m := range modes { // warm every path
		runLoad(16, 300*time.Millisecond, m.call)
	}
	measured := make([]map[string][]Load, len(concs))
	for run := range runs {
		for i, c := range concs {
			if measured[i] == nil {
				measured[i] = map[string][]Load{}
			}
			for k := range modes {
				m := modes[(run+i+k)%len(modes)]
				measured[i][m.name] = append(measured[i][m.name], runLoad(c, dur, m.call))
			}
			logf("cached (mutual TLS %v): run %d/%d, %d callers done", mtls, run+1, runs, c)
		}
	}
	points := make([]CachedPoint, len(concs))
	for i, c := range concs {
		m, errs := map[string]Load{}, 0
		for name, r := range measured[i] {
			m[name] = median(r)
			errs += m[name].Errors
		}
		// A failed call is fast: counted, it would flatter its mode.
		if errs > 0 {
			check(fmt.Errorf("cached (mutual TLS %v): %d calls failed at %d callers", mtls, errs, c))
		}
		points[i] = CachedPoint{Callers: c, Noop: m["noop"], Echo: m["echo"], Token: m["cached"]}
	}
	if c := s.idp.Counts(); c.RefreshGrants != 0 || c.PasswordGrants != 1 {
		check(fmt.Errorf("cached bench called upstream: %+v", c))
	}
	return points
}
