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
	conc          int
	noop, token   loadResult
	tputRatio     float64 // token / noop throughput
	p99Ratio      float64 // token / noop p99
	p50Ratio      float64
	noopRuns      []loadResult
	tokenRuns     []loadResult
	tokenFailures int
}

// benchCached compares cached GetAccessToken with the no-op RPC on the same
// server stack, interleaving the two modes, median of runs per figure.
func benchCached(dir string, concs []int, runs int, dur time.Duration, logf func(string, ...any)) ([]cachedPoint, error) {
	s, err := newStack(stackOptions{dir: dir, now: time.Now, conns: 4})
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
	// Warm both paths.
	runLoad(16, 300*time.Millisecond, token)
	runLoad(16, 300*time.Millisecond, noop)
	points := make([]cachedPoint, len(concs))
	for i, c := range concs {
		points[i].conc = c
	}
	for run := range runs {
		for i, c := range concs {
			// Alternate which mode goes first, so neither always runs on a
			// warmer (or more tired) machine.
			modes := []bool{false, true}
			if (run+i)%2 == 1 {
				modes = []bool{true, false}
			}
			for _, isToken := range modes {
				if isToken {
					r := runLoad(c, dur, token)
					points[i].tokenRuns = append(points[i].tokenRuns, r)
				} else {
					points[i].noopRuns = append(points[i].noopRuns, runLoad(c, dur, noop))
				}
			}
			logf("cached: run %d/%d concurrency %d done", run+1, runs, c)
		}
	}
	for i := range points {
		p := &points[i]
		p.noop, p.token = median(p.noopRuns), median(p.tokenRuns)
		p.tputRatio = p.token.throughput / p.noop.throughput
		p.p99Ratio = float64(p.token.p99) / float64(p.noop.p99)
		p.p50Ratio = float64(p.token.p50) / float64(p.noop.p50)
		p.tokenFailures = p.token.errors + p.noop.errors
	}
	if c := s.idp.Counts(); c.RefreshGrants != 0 || c.PasswordGrants != 1 {
		return nil, fmt.Errorf("cached bench called upstream: %+v", c)
	}
	return points, nil
}
