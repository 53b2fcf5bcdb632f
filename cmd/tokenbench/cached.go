package main

import (
	"context"
	"fmt"
	"time"

	pb "tokenbroker/gen/tokenbroker/v1"

	"tokenbroker/server/servertest"
)

// cachedPoint is one concurrency level of the cached-path comparison.
type cachedPoint struct {
	conc               int
	noop, echo, token  loadResult
	tputRatio          float64 // token / noop throughput
	p99Ratio           float64 // token / noop p99
	p50Ratio           float64
	echoTputRatio      float64 // token / echo throughput: the broker's own cost
	echoP99Ratio       float64
	noopRuns, echoRuns []loadResult
	tokenRuns          []loadResult
	// bareNoop and bareEcho are the two baselines on a bare gRPC server (no
	// interceptors, no broker), plaintext runs only: what gRPC and protobuf
	// alone charge for carrying a token request and answer.
	bareNoop, bareEcho         loadResult
	bareNoopRuns, bareEchoRuns []loadResult
}

// bare reports whether the point has the bare-server baselines.
func (p *cachedPoint) bare() bool { return len(p.bareNoopRuns) > 0 }

// benchCached compares cached GetAccessToken with the no-op RPC on the same
// server stack, plaintext or over mutual TLS with a policy, interleaving
// the modes, median of runs per figure.
func benchCached(dir string, mtls bool, concs []int, runs int, dur time.Duration, logf func(string, ...any)) ([]cachedPoint, error) {
	s, err := newStack(stackOptions{dir: dir, now: time.Now, conns: 4, mtls: mtls, bare: !mtls})
	if err != nil {
		return nil, err
	}
	defer s.close()
	names, err := s.createConnections(context.Background(), 1)
	if err != nil {
		return nil, err
	}
	name := names[0]
	token := func(ctx context.Context, w int) error {
		_, err := s.client(w).GetAccessToken(ctx, &pb.GetAccessTokenRequest{Name: name})
		return err
	}
	noop := func(ctx context.Context, w int) error {
		return servertest.CallNoop(ctx, s.conns[w%len(s.conns)])
	}
	// Each mode builds its request per call, as a caller does, and calls
	// the way a generated client does (servertest's callers mirror it).
	echo := func(ctx context.Context, w int) error {
		return servertest.CallEcho(ctx, s.conns[w%len(s.conns)], &pb.GetAccessTokenRequest{Name: name})
	}
	// The same two baselines on the bare server, when there is one.
	bareNoop := func(ctx context.Context, w int) error {
		return servertest.CallNoop(ctx, s.bareConns[w%len(s.bareConns)])
	}
	bareEcho := func(ctx context.Context, w int) error {
		return servertest.CallEcho(ctx, s.bareConns[w%len(s.bareConns)], &pb.GetAccessTokenRequest{Name: name})
	}
	points := make([]cachedPoint, len(concs))
	type mode struct {
		call func(context.Context, int) error
		runs func(p *cachedPoint) *[]loadResult
	}
	modes := []mode{
		{noop, func(p *cachedPoint) *[]loadResult { return &p.noopRuns }},
		{echo, func(p *cachedPoint) *[]loadResult { return &p.echoRuns }},
		{token, func(p *cachedPoint) *[]loadResult { return &p.tokenRuns }},
	}
	if len(s.bareConns) > 0 {
		modes = append(modes,
			mode{bareNoop, func(p *cachedPoint) *[]loadResult { return &p.bareNoopRuns }},
			mode{bareEcho, func(p *cachedPoint) *[]loadResult { return &p.bareEchoRuns }})
	}
	// Warm every path.
	for _, m := range modes {
		runLoad(16, 300*time.Millisecond, m.call)
	}
	for i, c := range concs {
		points[i].conc = c
	}
	for run := range runs {
		for i, c := range concs {
			// Rotate which mode goes first, so none always runs on a warmer
			// (or more tired) machine.
			for k := range modes {
				m := modes[(run+i+k)%len(modes)]
				r := m.runs(&points[i])
				*r = append(*r, runLoad(c, dur, m.call))
			}
			logf("cached (mutual TLS %v): run %d/%d concurrency %d done", mtls, run+1, runs, c)
		}
	}
	for i := range points {
		p := &points[i]
		p.noop, p.echo, p.token = median(p.noopRuns), median(p.echoRuns), median(p.tokenRuns)
		if p.bare() {
			p.bareNoop, p.bareEcho = median(p.bareNoopRuns), median(p.bareEchoRuns)
		}
		p.echoTputRatio = p.token.throughput / p.echo.throughput
		p.echoP99Ratio = float64(p.token.p99) / float64(p.echo.p99)
		p.tputRatio = p.token.throughput / p.noop.throughput
		p.p99Ratio = float64(p.token.p99) / float64(p.noop.p99)
		p.p50Ratio = float64(p.token.p50) / float64(p.noop.p50)
		// A failed call is fast: counted, it would flatter its mode.
		if n := p.noop.errors + p.echo.errors + p.token.errors + p.bareNoop.errors + p.bareEcho.errors; n > 0 {
			return nil, fmt.Errorf("cached bench (mutual TLS %v): %d calls failed at %d callers", mtls, n, p.conc)
		}
	}
	if c := s.idp.Counts(); c.RefreshGrants != 0 || c.PasswordGrants != 1 {
		return nil, fmt.Errorf("cached bench called upstream: %+v", c)
	}
	return points, nil
}
