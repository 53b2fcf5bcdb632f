package main

import (
	"context"
	"fmt"
	"math/rand/v2"
	"net/http/httptest"
	"path/filepath"
	"sync"
	"testing"
	"time"

	pb "tokenbroker/gen/tokenbroker/v1"

	"tokenbroker/broker/acumaticatest"
)

// TestKill9AtRandomPoints kills the real binary with SIGKILL at random
// moments of refresh traffic, 50 times, restarting it on the same data dir
// each time. After every restart each connection must serve a token that is
// live upstream (reporting a dead one as rejected, as callers are told to),
// none may be NEEDS_REAUTH, and upstream must never see a refresh token
// presented again: reuse detection would take it for theft.
func TestKill9AtRandomPoints(t *testing.T) {
	if testing.Short() {
		t.Skip("runs the binary 50 times")
	}
	seed := uint64(time.Now().UnixNano())
	t.Logf("seed %d", seed)
	rng := rand.New(rand.NewPCG(seed, 1))
	s := acumaticatest.New(acumaticatest.Options{Latency: 15 * time.Millisecond, LatencyAfter: 15 * time.Millisecond})
	s.AddClient(clientID, clientSecret)
	s.AddUser(username, password)
	hs := httptest.NewServer(s.Handler())
	defer hs.Close()
	dir := filepath.Join(t.TempDir(), "data")
	const conns = 4
	names := make([]string, conns)
	ctx := context.Background()

	// Back-to-back reports are the point here: no cooldown.
	args := []string{"--data-dir", dir, "--listen", "127.0.0.1:0", "--reject-cooldown", "0"}
	p := start(t, nil, args...)
	c := p.client()
	for i := range conns {
		names[i] = fmt.Sprintf("tenants/t%d/connections/erp", i)
		createConnection(t, c, fmt.Sprintf("tenants/t%d", i), hs.URL)
	}
	for crash := range 50 {
		// Refresh traffic: each connection's callers keep reporting the token
		// they hold as rejected, so refreshes run back to back.
		stop := make(chan struct{})
		var wg sync.WaitGroup
		for _, n := range names {
			wg.Add(1)
			go func() {
				defer wg.Done()
				last := ""
				for {
					select {
					case <-stop:
						return
					default:
					}
					cctx, cancel := context.WithTimeout(ctx, time.Second)
					r, err := c.GetAccessToken(cctx, &pb.GetAccessTokenRequest{Name: n, RejectedAccessToken: last})
					cancel()
					if err != nil {
						return // the server was killed
					}
					last = r.GetAccessToken()
				}
			}()
		}
		before := s.Counts()
		time.Sleep(time.Duration(rng.IntN(120)) * time.Millisecond) // the random crash point
		p.kill9()
		close(stop)
		wg.Wait()

		p = start(t, nil, args...)
		if p.addr == "" {
			t.Fatalf("crash %d: restart failed: %s", crash, p.out.String())
		}
		c = p.client()
		for _, n := range names {
			// Serve the stored token, then report it rejected: that joins
			// (or follows) the recovery refresh, so the crash's consequences
			// are settled within this round.
			r, err := c.GetAccessToken(ctx, &pb.GetAccessTokenRequest{Name: n})
			if err == nil {
				r, err = c.GetAccessToken(ctx, &pb.GetAccessTokenRequest{Name: n, RejectedAccessToken: r.GetAccessToken()})
			}
			if err != nil {
				t.Fatalf("crash %d: %s: %v\n%s", crash, n, err, p.out.String())
			}
			if !s.AccessTokenValid(r.GetAccessToken()) {
				t.Fatalf("crash %d: %s serves a dead token", crash, n)
			}
			got, err := c.GetConnection(ctx, &pb.GetConnectionRequest{Name: n})
			if err != nil || got.GetConnection().GetState() == pb.Connection_STATE_NEEDS_REAUTH {
				t.Fatalf("crash %d: %s state %v %v", crash, n, got.GetConnection().GetState(), err)
			}
		}
		after := s.Counts()
		if reused := after.ReuseDetected - before.ReuseDetected; reused != 0 {
			t.Fatalf("crash %d: %d refresh token reuses for %d connections, want none: a refresh token that may have been spent is never presented again", crash, reused, conns)
		}
		if pw := after.PasswordGrants - before.PasswordGrants; pw > conns {
			t.Fatalf("crash %d: %d password grants for %d connections (%+v -> %+v)", crash, pw, conns, before, after)
		}
	}
	final := s.Counts()
	t.Logf("50 crashes: %d refresh grants, %d password grants (incl. %d creates), %d reuse detections",
		final.RefreshGrants, final.PasswordGrants, conns, final.ReuseDetected)
}
