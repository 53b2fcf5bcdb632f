package main

import (
	"context"
	"fmt"
	"time"

	pb "tokenbroker/gen/tokenbroker/v1"

	"tokenbroker/server/servertest"
)

// ExpiryResult is many connections whose tokens expire together (as after
// an outage), one caller each released at once: every connection needs its
// own refresh, so the upstream cap and the group commit set the pace. (That
// a server which hangs holds only its per-host share of the cap is
// TestHungHostDoesNotStarveOthers.)
type ExpiryResult struct {
	Conns, UpstreamCap int
	LatencyMS          float64
	// FloorMS is the upstream alone: ceil(conns/cap) rounds of latency.
	FloorMS float64
	// LastMS is from the release until the last caller had its token;
	// NoopMS is the same release of no-op RPCs.
	LastMS, NoopMS float64
	Upstream       int // token requests the stand-in saw
	// Writes are durable writes (intent and commit per refresh), Commits
	// the commits that carried them.
	Writes, Commits int64
}

func (e *ExpiryResult) targets() []Target {
	return []Target{{Section: "expiry", Name: fmt.Sprintf("upstream requests for %d expired connections", e.Conns), Unit: "requests",
		Measured: float64(e.Upstream), Op: "exactly", Limit: float64(e.Conns),
		Note: fmt.Sprintf("last caller %.2fx the upstream floor; %.1f writes per commit", e.LastMS/e.FloorMS, float64(e.Writes)/float64(max(e.Commits, 1)))}}
}

// benchExpiry expires n connections' tokens at once and releases one
// caller per connection; the one stand-in serves for every instance, so
// one host may use the whole cap.
func benchExpiry(dir string, n int, latency time.Duration) *ExpiryResult {
	ctx, clk := context.Background(), &clock{}
	s := newStack(stackOptions{dir: dir, now: clk.Now, latency: latency, conns: 16})
	defer s.close()
	names := s.createConnections(n)
	res := &ExpiryResult{Conns: n, UpstreamCap: upstreamCap, LatencyMS: ms(latency),
		FloorMS: ms(time.Duration((n+upstreamCap-1)/upstreamCap) * latency)}
	res.NoopMS = ms(must(release(n, func(i int) error { return servertest.CallNoop(ctx, s.conns[i%len(s.conns)]) })))
	clk.Advance(2 * time.Hour)
	before := s.idp.Counts()
	c0, w0 := s.store.CommitStats()
	res.LastMS = ms(must(release(n, func(i int) error {
		_, err := s.client(i).GetAccessToken(ctx, &pb.GetAccessTokenRequest{Name: names[i]})
		return err
	})))
	after := s.idp.Counts()
	c1, w1 := s.store.CommitStats()
	res.Upstream = (after.RefreshGrants + after.PasswordGrants) - (before.RefreshGrants + before.PasswordGrants)
	res.Writes, res.Commits = w1-w0, c1-c0
	return res
}
