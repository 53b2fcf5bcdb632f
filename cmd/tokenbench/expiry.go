package main

import (
	"context"
	"fmt"
	"time"

	pb "tokenbroker/gen/tokenbroker/v1"

	"tokenbroker/server/servertest"
	"tokenbroker/storage/bolt"
)

// expiryResult is many connections whose tokens expire together (as after
// an outage), each asked for by one caller at the same moment.
type expiryResult struct {
	conns, upstreamCap int
	latency            time.Duration
	elapsed            time.Duration // release until the last caller has its token
	noop               time.Duration // the same release of no-op RPCs
	floor              time.Duration // the upstream alone: ceil(conns/cap) rounds of latency
	upstream, failed   int           // token requests seen by the stand-in; callers without a token
	writes, commits    int64         // durable writes (intent + commit per refresh) and the commits carrying them
}

// benchExpiry expires n connections' tokens at once and releases one caller
// per connection: every connection needs its own refresh, so the broker's
// upstream cap and the group commit set the pace.
func benchExpiry(dir string, n int, latency time.Duration) (*expiryResult, error) {
	ctx := context.Background()
	clk := &clock{t: time.Now()}
	s, err := newStack(stackOptions{dir: dir, now: clk.Now, latency: latency, conns: 16})
	if err != nil {
		return nil, err
	}
	defer s.close()
	names, err := s.createConnections(ctx, n)
	if err != nil {
		return nil, err
	}
	res := &expiryResult{conns: n, upstreamCap: upstreamCap, latency: latency}
	res.floor = time.Duration((n+upstreamCap-1)/upstreamCap) * latency
	if res.noop, err = release(n, func(i int) error { return servertest.CallNoop(ctx, s.conns[i%len(s.conns)]) }); err != nil {
		return nil, err
	}
	bst := s.store.(*bolt.Store)
	clk.Advance(2 * time.Hour)
	before := s.idp.Counts()
	c0, w0 := bst.CommitStats()
	tokens := make([]string, n)
	res.elapsed, err = release(n, func(i int) error {
		r, err := s.client(i).GetAccessToken(ctx, &pb.GetAccessTokenRequest{Name: names[i]})
		tokens[i] = r.GetAccessToken()
		return err
	})
	after := s.idp.Counts()
	c1, w1 := bst.CommitStats()
	res.upstream = (after.RefreshGrants + after.PasswordGrants) - (before.RefreshGrants + before.PasswordGrants)
	res.writes, res.commits = w1-w0, c1-c0
	for _, t := range tokens {
		if t == "" {
			res.failed++
		}
	}
	if err != nil {
		return res, fmt.Errorf("expiry: %w", err)
	}
	return res, nil
}
