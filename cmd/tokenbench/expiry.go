package main

import (
	"context"
	"fmt"
	"net/http"
	"net/http/httptest"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	pb "tokenbroker/gen/tokenbroker/v1"

	"tokenbroker/broker"
	"tokenbroker/broker/acumaticatest"
)

// ExpiryResult is many connections on one server whose tokens expire
// together (as after an outage), one caller each released at once, with
// the broker's default per-host share of the upstream cap: once with
// nothing else going on, and once while a second server holds every token
// request sent to it until the broker's upstream timeout.
type ExpiryResult struct {
	Conns, Hung, PerHost             int
	LatencyMS, TimeoutMS, DeadlineMS float64
	// FloorMS is the upstream alone: ceil(conns/share) rounds of latency.
	FloorMS        float64
	Calm, WithHung ExpiryRun
}

// ExpiryRun is one release of the callers on a fresh server.
type ExpiryRun struct {
	Served, Upstream int
	LastMS           float64 // release until the last caller was answered
	// Writes are durable writes (intent and commit per refresh), Commits
	// the commits that carried them.
	Writes, Commits int64
	Held            int // token requests held at the hung server
}

// hungFactor is how much longer the connections may take to refresh while
// another server hangs.
const hungFactor = 1.5

func (e *ExpiryResult) targets() []Target {
	return []Target{
		{Section: "expiry", Name: fmt.Sprintf("upstream requests for %d expired connections", e.Conns), Unit: "requests",
			Measured: float64(e.Calm.Upstream), Op: "==", Limit: float64(e.Conns),
			Note: fmt.Sprintf("last caller %.2fx the upstream floor; %.1f writes per commit", e.Calm.LastMS/e.FloorMS, float64(e.Calm.Writes)/float64(max(e.Calm.Commits, 1)))},
		{Section: "expiry", Name: "callers served while another server hangs", Unit: "callers",
			Measured: float64(e.WithHung.Served), Op: "==", Limit: float64(e.Conns)},
		{Section: "expiry", Name: "last caller while another server hangs, vs none hanging", Unit: "ms",
			Measured: e.WithHung.LastMS, Op: "<=", Baseline: e.Calm.LastMS, Factor: hungFactor,
			Note: fmt.Sprintf("the hung server held %d requests", e.WithHung.Held)},
	}
}

// benchExpiry releases the callers of n expired connections on a fresh
// server twice: calm, then with hung connections on a hung server first.
func benchExpiry(dir string, n, hung int, latency time.Duration) *ExpiryResult {
	share := broker.DefaultMaxConcurrentUpstreamPerHost
	res := &ExpiryResult{Conns: n, Hung: hung, PerHost: share, LatencyMS: ms(latency), TimeoutMS: 2000, DeadlineMS: 10000,
		FloorMS: ms(time.Duration((n+share-1)/share) * latency)}
	res.Calm, res.WithHung = expireOnce(mkdir(dir, "calm"), res, false), expireOnce(mkdir(dir, "hung"), res, true)
	return res
}

func expireOnce(dir string, res *ExpiryResult, withHung bool) ExpiryRun {
	var run ExpiryRun
	ctx := context.Background()
	clk := &clock{}
	s := newStack(stackOptions{dir: dir, now: clk.Now, latency: time.Duration(res.LatencyMS * 1e6), conns: 16,
		perHost: res.PerHost, upstreamTimeout: time.Duration(res.TimeoutMS * 1e6)})
	defer s.close()
	names := s.createConnections(res.Conns)
	call := func(i int, name string) bool {
		cctx, cancel := context.WithTimeout(ctx, time.Duration(res.DeadlineMS*1e6))
		defer cancel()
		r, err := s.client(i).GetAccessToken(cctx, &pb.GetAccessTokenRequest{Name: name})
		return err == nil && r.GetAccessToken() != ""
	}
	unblock := make(chan struct{})
	var hungCalls sync.WaitGroup
	if withHung {
		h := startHungServer(unblock)
		defer h.close()
		hungNames := s.createConnectionsOn(h.url, "h", res.Hung)
		h.hanging.Store(true)
		clk.Advance(2 * time.Hour)
		for i, name := range hungNames {
			hungCalls.Go(func() { call(i, name) })
		}
		// The hung server now holds as many token requests as it may.
		for range min(res.PerHost, upstreamCap, res.Hung) {
			<-h.arrived
		}
		run.Held = int(h.inflight.Load())
	} else {
		clk.Advance(2 * time.Hour)
	}
	// Before the hung server closes, which waits for its requests.
	defer func() { close(unblock); hungCalls.Wait() }()
	before := s.idp.Counts()
	c0, w0 := s.store.CommitStats()
	var served atomic.Int64
	last, _ := release(len(names), func(i int) error {
		if call(i, names[i]) {
			served.Add(1)
		}
		return nil
	})
	after := s.idp.Counts()
	c1, w1 := s.store.CommitStats()
	run.Served, run.LastMS = int(served.Load()), ms(last)
	run.Upstream = (after.RefreshGrants + after.PasswordGrants) - (before.RefreshGrants + before.PasswordGrants)
	run.Writes, run.Commits = w1-w0, c1-c0
	return run
}

// hungServer is a stand-in that, once hanging, holds every token request
// until unblock closes or the client gives up.
type hungServer struct {
	url      string
	hanging  atomic.Bool
	arrived  chan struct{}
	inflight atomic.Int64 // requests held now
	close    func()
}

func startHungServer(unblock <-chan struct{}) *hungServer {
	idp := acumaticatest.New(acumaticatest.Options{})
	idp.AddClient(clientID, clientSecret)
	idp.AddUser(username, password)
	h := &hungServer{arrived: make(chan struct{}, 4096)}
	next := idp.Handler()
	hs := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		if h.hanging.Load() && strings.HasSuffix(r.URL.Path, "/token") {
			h.inflight.Add(1)
			select {
			case h.arrived <- struct{}{}:
			default:
			}
			select {
			case <-unblock:
			case <-r.Context().Done():
			}
			h.inflight.Add(-1)
			if r.Context().Err() != nil {
				return
			}
		}
		next.ServeHTTP(w, r)
	}))
	h.url, h.close = hs.URL, hs.Close
	return h
}
