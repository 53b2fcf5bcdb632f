package main

import (
	"context"
	"errors"
	"fmt"
	"sync"
	"time"

	"google.golang.org/grpc"

	pb "tokenbroker/gen/tokenbroker/v1"

	"tokenbroker/broker/acumaticatest"
)

// HerdResult is one herd size: callers on an expired token, parked (every
// caller already waiting when the one token request goes on) and released
// at once (their arrival included), each against no-op RPCs handled the
// same way on the same server. Times are medians, in milliseconds.
type HerdResult struct {
	Callers, Herds int   // herds of each kind
	UpstreamCalls  []int // per herd, released and parked in turn
	// LatencyMS is added by the stand-in; CommitMS is one durable commit
	// on the same file.
	LatencyMS, CommitMS    float64
	ParkedMS, ParkedNoopMS float64
	// AnsweredMS is when the stand-in answered the parked herd's token
	// request, from the start of its clock.
	AnsweredMS                 float64
	ReleasedMS, ReleasedNoopMS float64
}

// herdSlackMS is what the parked herd may take over its no-op baseline
// beyond one token request and one commit.
const herdSlackMS = 10

// LimitMS is the parked herd's limit over its baseline: the upstream
// latency, one commit and herdSlackMS.
func (h *HerdResult) LimitMS() float64 { return h.LatencyMS + h.CommitMS + herdSlackMS }

// herdTargets: every herd of every size made one upstream call, and the
// largest herd's parked time over its baseline is within its limit.
func herdTargets(herds []*HerdResult) []Target {
	one, all := 0, 0
	for _, h := range herds {
		for _, c := range h.UpstreamCalls {
			all++
			if c == 1 {
				one++
			}
		}
	}
	h := herds[len(herds)-1]
	return []Target{
		{Section: "herd", Name: "herds with exactly one upstream token request", Unit: "herds", Measured: float64(one), Op: "exactly", Limit: float64(all)},
		{Section: "herd", Name: fmt.Sprintf("parked herd of %d over its no-op baseline", h.Callers), Unit: "ms",
			Measured: h.ParkedMS - h.ParkedNoopMS, Op: "at most", Limit: h.LimitMS(),
			Note: fmt.Sprintf("released at once: %.1f ms over its baseline", h.ReleasedMS-h.ReleasedNoopMS)},
	}
}

// benchHerd measures n callers on an expired token through real gRPC,
// against the stand-in with added latency, parked and released. Each has a
// no-op baseline on the same server; runs are interleaved.
func benchHerd(dir string, n, runs int, latency time.Duration) *HerdResult {
	clk := &clock{}
	upstream, misses, park := &parking{}, &parking{}, &parking{}
	s := newStack(stackOptions{dir: dir, now: clk.Now, latency: latency, conns: 16,
		wrapIDP: upstream.holdTokenRequests, observe: misses.countMisses, park: park})
	defer s.close()
	name := s.createConnections(1)[0]
	res := &HerdResult{Callers: n, Herds: runs, LatencyMS: ms(latency), CommitMS: ms(commitTime(s, name))}
	req := &pb.GetAccessTokenRequest{Name: name}
	get := func(i int) (string, error) {
		r, err := s.client(i).GetAccessToken(context.Background(), req)
		return r.GetAccessToken(), err
	}
	// The baselines call the parked RPC (same request and answer shapes);
	// unarmed, it answers at once.
	callPark := func(i int) error {
		return s.conns[i%len(s.conns)].Invoke(context.Background(), parkMethod, req, new(pb.GetAccessTokenResponse), grpc.StaticMethod())
	}
	var released, releasedNoop, parked, parkedNoop, answered []time.Duration
	for range runs {
		releasedNoop = append(releasedNoop, must(release(n, callPark)))
		d, calls := herdOnce(clk, s.idp, n, get, func(call func(int) error) (time.Duration, error) { return release(n, call) })
		released, res.UpstreamCalls = append(released, d), append(res.UpstreamCalls, calls)
		all := park.arm(n, true)
		parkedNoop = append(parkedNoop, must(parkThenRelease(n, func() { <-all }, park.open, callPark)))
		d, calls = herdOnce(clk, s.idp, n, get, func(call func(int) error) (time.Duration, error) {
			// Every caller misses the cache and joins the one refresh,
			// whose token request is held at the stand-in; then it goes on.
			allMissed, held := misses.arm(n, false), upstream.arm(1, true)
			defer misses.open()
			var opened time.Time
			d, err := parkThenRelease(n, func() { <-allMissed; <-held }, func() { opened = time.Now(); upstream.open() }, call)
			answered = append(answered, time.Unix(0, upstream.answered.Load()).Sub(opened))
			return d, err
		})
		parked, res.UpstreamCalls = append(parked, d), append(res.UpstreamCalls, calls)
	}
	res.ReleasedMS, res.ReleasedNoopMS = ms(medianDur(released)), ms(medianDur(releasedNoop))
	res.ParkedMS, res.ParkedNoopMS, res.AnsweredMS = ms(medianDur(parked)), ms(medianDur(parkedNoop)), ms(medianDur(answered))
	return res
}

// commitTime is the median of 21 durable commits of name's token state.
func commitTime(s *stack, name string) time.Duration {
	tok := must(s.store.GetTokens(context.Background(), name))
	var commits []time.Duration
	for range 21 {
		t0 := time.Now()
		check(s.store.PutTokens(context.Background(), name, tok))
		commits = append(commits, time.Since(t0))
	}
	return medianDur(commits)
}

// parkThenRelease starts n callers, waits until all have arrived (ready
// returns), runs open, and returns the time from open until the last caller
// is done.
func parkThenRelease(n int, ready, open func(), call func(i int) error) (time.Duration, error) {
	errs := make([]error, n)
	var done sync.WaitGroup
	for i := range n {
		done.Go(func() { errs[i] = call(i) })
	}
	ready()
	t0 := time.Now()
	open()
	done.Wait()
	return time.Since(t0), errors.Join(errs...)
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
	return time.Since(t0), errors.Join(errs...)
}

// herdOnce lets the token expire (clk), has run call get for each of n
// callers, and returns run's time and the upstream token requests idp saw
// meanwhile. A caller without a token, or a second token handed out, ends
// the benchmark.
func herdOnce(clk *clock, idp *acumaticatest.Server, n int, get func(i int) (string, error),
	run func(call func(i int) error) (time.Duration, error)) (time.Duration, int) {
	tokens := make([]string, n)
	clk.Advance(2 * time.Hour)
	before := idp.Counts()
	d := must(run(func(i int) (err error) { tokens[i], err = get(i); return err }))
	after := idp.Counts()
	seen := map[string]bool{}
	for _, t := range tokens {
		seen[t] = true
	}
	if seen[""] || len(seen) != 1 {
		check(fmt.Errorf("herd of %d: %d distinct tokens handed out, an empty one among them: %v", n, len(seen), seen[""]))
	}
	return d, (after.RefreshGrants + after.PasswordGrants) - (before.RefreshGrants + before.PasswordGrants)
}
