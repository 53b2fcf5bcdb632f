package main

import (
	"context"
	"fmt"
	"time"

	pb "tokenbroker/gen/tokenbroker/v1"

	"tokenbroker/server/servertest"
)

// CachedResult is cached GetAccessToken against the bare echo, with the
// same-stack echo and no-op as context, plaintext and over mutual TLS.
type CachedResult struct {
	Runs                 int
	Seconds              float64 // per run
	Plaintext, MutualTLS []CachedPoint
}

// CachedPoint is one concurrency level: the median of each mode's runs.
// Bare is the echo on a bare grpc.NewServer, Echo and Noop are on the
// broker's server with its interceptors.
type CachedPoint struct {
	Callers                 int
	Bare, Echo, Noop, Token Load
}

// modeLoad is one mode's load at one level, a row of the report.
type modeLoad struct {
	Mode string
	Load
}

// Rows are p's modes for the report, the bare echo first.
func (p CachedPoint) Rows() []modeLoad {
	return []modeLoad{{"bare echo", p.Bare}, {"same-stack echo", p.Echo}, {"same-stack no-op", p.Noop}, {"cached GetAccessToken", p.Token}}
}

// Cached throughput and p99 against the bare echo.
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
			at := fmt.Sprintf("concurrency %d, %s", p.Callers, set.how)
			// The notes split the cost: the broker's own (cached over
			// same-stack echo) and the interceptor chain's (same-stack
			// echo over bare echo).
			note := func(f func(Load) float64) string {
				return fmt.Sprintf("cached / same-stack echo %.3f; same-stack echo / bare echo %.3f; cached / no-op %.3f",
					f(p.Token)/f(p.Echo), f(p.Echo)/f(p.Bare), f(p.Token)/f(p.Noop))
			}
			perSecond, p99 := func(l Load) float64 { return l.PerSecond }, func(l Load) float64 { return l.P99US }
			ts = append(ts, Target{Section: "cached", Name: "throughput vs bare echo, " + at, Unit: "calls/s", Measured: p.Token.PerSecond,
				Op: "at least", Baseline: p.Bare.PerSecond, Factor: cachedThroughputFactor, Note: note(perSecond)},
				Target{Section: "cached", Name: "p99 vs bare echo, " + at, Unit: "µs", Measured: p.Token.P99US,
					Op: "at most", Baseline: p.Bare.P99US, Factor: cachedP99Factor, Note: note(p99)})
		}
	}
	return ts
}

// benchCached measures cached GetAccessToken, the baselines on its server
// and the bare echo on its own server in the same process, plaintext or over
// mutual TLS with a policy: the modes interleaved, the one going first
// rotated, the median of runs per figure.
func benchCached(dir string, mtls bool, concs []int, runs int, dur time.Duration) []CachedPoint {
	s := newStack(stackOptions{dir: dir, now: time.Now, conns: 4, mtls: mtls, bareEcho: true})
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
		{"bare", func(ctx context.Context, w int) error {
			return servertest.CallEcho(ctx, s.bare[w%len(s.bare)], &pb.GetAccessTokenRequest{Name: name})
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
		points[i] = CachedPoint{Callers: c, Bare: m["bare"], Echo: m["echo"], Noop: m["noop"], Token: m["cached"]}
	}
	if c := s.idp.Counts(); c.RefreshGrants != 0 || c.PasswordGrants != 1 {
		check(fmt.Errorf("cached bench called upstream: %+v", c))
	}
	return points
}
