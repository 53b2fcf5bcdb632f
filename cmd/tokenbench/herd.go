package main

import (
	"context"
	"fmt"
	"slices"
	"sync"
	"time"

	pb "tokenbroker/gen/tokenbroker/v1"
)

type herdResult struct {
	callers       int
	runs          int
	upstreamCalls []int         // per herd, released and parked
	latency       time.Duration // added upstream latency
	fsyncP50      time.Duration // one durable commit
	distinct      int           // most distinct tokens handed out by one herd
	errors        int
	target        time.Duration
	// Released at once: from the release of every caller until the last
	// has its token, and the same release of no-op RPCs.
	lastCaller, noopHerd time.Duration
	// Parked: every caller is already waiting at the server; from the
	// moment the held token request goes on until the last caller has its
	// token, and the same for no-op RPCs held and released at once.
	parked, parkedNoop time.Duration
	// answered is when, in the parked herd, the stand-in answered the one
	// token request; afterAnswer is from then until the last caller had
	// its token (the commit and the fan-out).
	answered, afterAnswer time.Duration
}

// benchHerd measures n callers on an expired token through real gRPC,
// against the stand-in with added latency, two ways: released at once (the
// callers' own arrival included), and parked (every caller already waiting
// when the token request starts). Each has a no-op baseline on the same
// server; runs are interleaved and each figure is the median.
func benchHerd(dir string, n, runs int, latency time.Duration) (*herdResult, error) {
	clk := &clock{t: time.Now()}
	upstream, misses, park := &parking{}, &parking{}, &parking{}
	s, err := newStack(stackOptions{dir: dir, now: clk.Now, latency: latency, conns: 16,
		wrapIDP: upstream.holdTokenRequests, observe: misses.countMisses, park: park})
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
	res := &herdResult{callers: n, runs: runs, latency: latency, fsyncP50: commits[len(commits)/2]}
	res.target = 2 * (latency + res.fsyncP50)
	req := &pb.GetAccessTokenRequest{Name: names[0]}
	tokens := make([]string, n)
	getToken := func(i int) error {
		r, err := s.client(i).GetAccessToken(context.Background(), req)
		tokens[i] = r.GetAccessToken()
		return err
	}
	// herd runs one herd on a freshly expired token and checks its outcome.
	herd := func(run func() (time.Duration, error)) (time.Duration, error) {
		d, calls, failed, distinct, err := herdOnce(clk, s.idp, tokens, run)
		res.upstreamCalls = append(res.upstreamCalls, calls)
		res.errors += failed
		res.distinct = max(res.distinct, distinct)
		return d, err
	}
	var released, noopReleased, parked, parkedNoop, answered, afterAnswer []time.Duration
	for range runs {
		// The baselines use the parked RPC (same request and answer shapes);
		// unarmed, it answers at once.
		d, err := release(n, func(i int) error { return callPark(context.Background(), s.conns[i%len(s.conns)], req) })
		if err != nil {
			return nil, err
		}
		noopReleased = append(noopReleased, d)
		if d, err = herd(func() (time.Duration, error) { return release(n, getToken) }); err != nil {
			return nil, fmt.Errorf("herd: %w", err)
		}
		released = append(released, d)
		all := park.arm(n, true)
		if d, err = parkThenRelease(n, func() { <-all }, park.open, func(i int) error { return callPark(context.Background(), s.conns[i%len(s.conns)], req) }); err != nil {
			return nil, err
		}
		parkedNoop = append(parkedNoop, d)
		if d, err = herd(func() (time.Duration, error) {
			// Every caller misses the cache and joins the one refresh,
			// whose token request is held at the stand-in; then it goes on.
			allMissed, held := misses.arm(n, false), upstream.arm(1, true)
			defer misses.open()
			var opened time.Time
			d, err := parkThenRelease(n, func() { <-allMissed; <-held }, func() { opened = time.Now(); upstream.open() }, getToken)
			a := time.Unix(0, upstream.answered.Load()).Sub(opened)
			answered, afterAnswer = append(answered, a), append(afterAnswer, d-a)
			return d, err
		}); err != nil {
			return nil, fmt.Errorf("parked herd: %w", err)
		}
		parked = append(parked, d)
	}
	res.lastCaller, res.noopHerd = medianDur(released), medianDur(noopReleased)
	res.parked, res.parkedNoop = medianDur(parked), medianDur(parkedNoop)
	res.answered, res.afterAnswer = medianDur(answered), medianDur(afterAnswer)
	if res.errors > 0 {
		return res, fmt.Errorf("herd: %d callers failed", res.errors)
	}
	return res, nil
}

// parkThenRelease starts n callers, waits until all have arrived (ready
// returns), runs open, and returns the time from open until the last caller
// is done.
func parkThenRelease(n int, ready, open func(), call func(i int) error) (time.Duration, error) {
	errs := make([]error, n)
	var done sync.WaitGroup
	for i := range n {
		done.Add(1)
		go func() {
			defer done.Done()
			errs[i] = call(i)
		}()
	}
	ready()
	t0 := time.Now()
	open()
	done.Wait()
	return time.Since(t0), firstErr(errs)
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
