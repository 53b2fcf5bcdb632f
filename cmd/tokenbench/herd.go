package main

import (
	"context"
	"fmt"
	"slices"
	"sync"
	"time"

	pb "tokenbroker/gen/tokenbroker/v1"

	"tokenbroker/server/servertest"
)

type herdResult struct {
	callers       int
	upstreamCalls int
	latency       time.Duration // added upstream latency
	fsyncP50      time.Duration // one durable commit
	lastCaller    time.Duration // until the last caller had its token
	distinct      int           // distinct tokens handed out
	errors        int
	target        time.Duration
	noopHerd      time.Duration // the same release of no-op RPCs: the cost of the fan-out itself
}

// benchHerd releases n callers at once on an expired token through real
// gRPC, against the stand-in with added latency.
func benchHerd(dir string, n int, latency time.Duration) (*herdResult, error) {
	clk := &clock{t: time.Now()}
	s, err := newStack(stackOptions{dir: dir, now: clk.Now, latency: latency, conns: 16})
	if err != nil {
		return nil, err
	}
	defer s.close()
	names, err := s.createConnections(context.Background(), 1)
	if err != nil {
		return nil, err
	}
	// One durable commit, measured on the same file.
	var commits []time.Duration
	tok, err := s.store.GetTokens(context.Background(), names[0])
	if err != nil {
		return nil, err
	}
	for range 21 {
		t0 := time.Now()
		if err := s.store.PutTokens(context.Background(), names[0], tok); err != nil {
			return nil, err
		}
		commits = append(commits, time.Since(t0))
	}
	slices.Sort(commits)
	// Baseline: the same number of callers released at once on the no-op
	// RPC of the same server, so the fan-out's own cost is known.
	noopHerd, err := release(n, func(i int) error { return servertest.CallNoop(context.Background(), s.conns[i%len(s.conns)]) })
	if err != nil {
		return nil, err
	}
	clk.Advance(2 * time.Hour) // the token has expired
	before := s.idp.Counts()
	res := &herdResult{callers: n, latency: latency, fsyncP50: commits[len(commits)/2], noopHerd: noopHerd}
	tokens := make([]string, n)
	lastCaller, _ := release(n, func(i int) error {
		r, err := s.client(i).GetAccessToken(context.Background(), &pb.GetAccessTokenRequest{Name: names[0]})
		tokens[i] = r.GetAccessToken()
		return err
	})
	res.lastCaller = lastCaller
	after := s.idp.Counts()
	res.upstreamCalls = (after.RefreshGrants + after.PasswordGrants) - (before.RefreshGrants + before.PasswordGrants)
	seen := map[string]bool{}
	for i := range n {
		if tokens[i] == "" {
			res.errors++
			continue
		}
		seen[tokens[i]] = true
	}
	res.distinct = len(seen)
	res.target = 2 * (latency + res.fsyncP50)
	if res.errors > 0 {
		return res, fmt.Errorf("herd: %d callers failed", res.errors)
	}
	return res, nil
}

func firstErr(errs []error) error {
	for _, e := range errs {
		if e != nil {
			return e
		}
	}
	return nil
}

// release starts n callers at once and returns when the last is done.
func release(n int, call func(i int) error) (time.Duration, error) {
	errs := make([]error, n)
	start := make(chan struct{})
	var ready, done sync.WaitGroup
	for i := range n {
		ready.Add(1)
		done.Add(1)
		go func() {
			defer done.Done()
			ready.Done()
			<-start
			errs[i] = call(i)
		}()
	}
	ready.Wait()
	t0 := time.Now()
	close(start)
	done.Wait()
	return time.Since(t0), firstErr(errs)
}
