package main

import (
	"context"
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
	Callers       int     `json:"callers"`
	Herds         int     `json:"herds_of_each_kind"`
	UpstreamCalls []int   `json:"upstream_calls_per_herd"` // released and parked in turn
	Distinct      int     `json:"most_distinct_tokens_in_a_herd"`
	LatencyMS     float64 `json:"upstream_latency_ms"` // added by the stand-in
	CommitMS      float64 `json:"commit_ms"`           // one durable commit on the same file
	ParkedMS      float64 `json:"parked_ms"`
	ParkedNoopMS  float64 `json:"parked_noop_ms"`
	// AnsweredMS is when the stand-in answered the parked herd's token
	// request, from the start of its clock.
	AnsweredMS     float64 `json:"parked_answered_ms"`
	ReleasedMS     float64 `json:"released_ms"`
	ReleasedNoopMS float64 `json:"released_noop_ms"`
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
		{Section: "herd", Name: "herds with exactly one upstream token request", Unit: "herds", Measured: float64(one), Op: "==", Limit: float64(all)},
		{Section: "herd", Name: fmt.Sprintf("parked herd of %d over its no-op baseline", h.Callers), Unit: "ms",
			Measured: h.ParkedMS - h.ParkedNoopMS, Op: "<=", Limit: h.LimitMS(),
			Note: fmt.Sprintf("released at once: %.1f ms over its baseline", h.ReleasedMS-h.ReleasedNoopMS)},
	}
}

// benchHerd measures n callers on an expired token through real gRPC,
// against the stand-in with added latency, parked and released. Each has a
// no-op baseline on the same server; runs are interleaved.
func benchHerd(dir string, n, runs int, latency time.Duration) (*HerdResult, error) {
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
	commit, err := commitTime(s, names[0])
	if err != nil {
		return nil, err
	}
	res := &HerdResult{Callers: n, Herds: runs, LatencyMS: ms(latency), CommitMS: ms(commit)}
	req := &pb.GetAccessTokenRequest{Name: names[0]}
	tokens := make([]string, n)
	getToken := func(i int) error {
		r, err := s.client(i).GetAccessToken(context.Background(), req)
		tokens[i] = r.GetAccessToken()
		return err
	}
	callPark := func(i int) error {
		return s.conns[i%len(s.conns)].Invoke(context.Background(), parkMethod, req, new(pb.GetAccessTokenResponse), grpc.StaticMethod())
	}
	// herd runs one herd on a freshly expired token and checks its outcome.
	herd := func(run func() (time.Duration, error)) (time.Duration, error) {
		d, calls, failed, distinct, err := herdOnce(clk, s.idp, tokens, run)
		res.UpstreamCalls = append(res.UpstreamCalls, calls)
		res.Distinct = max(res.Distinct, distinct)
		if err == nil && failed > 0 {
			err = fmt.Errorf("%d callers got no token", failed)
		}
		return d, err
	}
	var released, releasedNoop, parked, parkedNoop, answered []time.Duration
	for range runs {
		// The baselines use the parked RPC (same request and answer
		// shapes); unarmed, it answers at once.
		d, err := release(n, callPark)
		if err != nil {
			return nil, err
		}
		releasedNoop = append(releasedNoop, d)
		if d, err = herd(func() (time.Duration, error) { return release(n, getToken) }); err != nil {
			return nil, fmt.Errorf("herd: %w", err)
		}
		released = append(released, d)
		all := park.arm(n, true)
		if d, err = parkThenRelease(n, func() { <-all }, park.open, callPark); err != nil {
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
			answered = append(answered, time.Unix(0, upstream.answered.Load()).Sub(opened))
			return d, err
		}); err != nil {
			return nil, fmt.Errorf("parked herd: %w", err)
		}
		parked = append(parked, d)
	}
	res.ReleasedMS, res.ReleasedNoopMS = ms(medianDur(released)), ms(medianDur(releasedNoop))
	res.ParkedMS, res.ParkedNoopMS, res.AnsweredMS = ms(medianDur(parked)), ms(medianDur(parkedNoop)), ms(medianDur(answered))
	return res, nil
}

// commitTime is the median of 21 durable commits of name's token state.
func commitTime(s *stack, name string) (time.Duration, error) {
	tok, err := s.store.GetTokens(context.Background(), name)
	if err != nil {
		return 0, err
	}
	var commits []time.Duration
	for range 21 {
		t0 := time.Now()
		if err := s.store.PutTokens(context.Background(), name, tok); err != nil {
			return 0, err
		}
		commits = append(commits, time.Since(t0))
	}
	return medianDur(commits), nil
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

// herdOnce lets the token expire (clk), runs run, and reports the upstream
// token requests idp saw meanwhile, how many callers got no token (tokens
// holds each caller's) and how many distinct tokens were handed out.
func herdOnce(clk *clock, idp *acumaticatest.Server, tokens []string, run func() (time.Duration, error)) (d time.Duration, calls, failed, distinct int, err error) {
	clear(tokens)
	clk.Advance(2 * time.Hour)
	before := idp.Counts()
	d, err = run()
	after := idp.Counts()
	calls = (after.RefreshGrants + after.PasswordGrants) - (before.RefreshGrants + before.PasswordGrants)
	seen := map[string]bool{}
	for _, t := range tokens {
		if t == "" {
			failed++
		}
		seen[t] = true
	}
	return d, calls, failed, len(seen), err
}
