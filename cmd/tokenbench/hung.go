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

// hungResult is connections on a healthy server expiring together while a
// second server holds every token request sent to it, with and without a
// per-host share of the upstream cap.
type hungResult struct {
	healthy, hung int           // connections on each server
	timeout       time.Duration // the broker's upstream timeout
	deadline      time.Duration // each caller's deadline
	latency       time.Duration // the healthy server's added latency
	rows          []hungRow
}

type hungRow struct {
	perHost        int
	withHung       bool
	served, failed int           // healthy callers with a token, without one
	last           time.Duration // release until the last healthy caller was answered
	held           int           // token requests held at the hung server when the healthy callers were released
}

// benchHung measures, for the per-host share of the whole cap (no share)
// and the default share, how long the healthy server's connections take to
// refresh with and without the other server hanging.
func benchHung(dir string, healthy, hung int, latency time.Duration) (*hungResult, error) {
	res := &hungResult{healthy: healthy, hung: hung, timeout: 2 * time.Second, deadline: 10 * time.Second, latency: latency}
	for _, perHost := range []int{upstreamCap, defaultPerHost} {
		for _, withHung := range []bool{false, true} {
			row, err := hungOnce(mkdir(dir, fmt.Sprint(len(res.rows))), res, perHost, withHung)
			if err != nil {
				return nil, err
			}
			res.rows = append(res.rows, row)
		}
	}
	return res, nil
}

// defaultPerHost is the broker's default per-host share.
const defaultPerHost = broker.DefaultMaxConcurrentUpstreamPerHost

func hungOnce(dir string, res *hungResult, perHost int, withHung bool) (hungRow, error) {
	ctx := context.Background()
	row := hungRow{perHost: perHost, withHung: withHung}
	clk := &clock{t: time.Now()}
	s, err := newStack(stackOptions{dir: dir, now: clk.Now, latency: res.latency, conns: 16, perHost: perHost, upstreamTimeout: res.timeout})
	if err != nil {
		return row, err
	}
	defer s.close()
	names, err := s.createConnections(ctx, res.healthy)
	if err != nil {
		return row, err
	}
	unblock := make(chan struct{})
	var hungCalls sync.WaitGroup
	var h *hungServer
	if withHung {
		h = startHungServer(unblock)
		defer h.close()
		hungNames, err := s.createConnectionsOn(ctx, h.url, "h", res.hung)
		if err != nil {
			return row, err
		}
		h.hanging.Store(true)
		clk.Advance(2 * time.Hour)
		for i, name := range hungNames {
			hungCalls.Add(1)
			go func() {
				defer hungCalls.Done()
				cctx, cancel := context.WithTimeout(ctx, res.deadline)
				defer cancel()
				s.client(i).GetAccessToken(cctx, &pb.GetAccessTokenRequest{Name: name})
			}()
		}
		// The hung server now holds as many token requests as it may.
		for range min(perHost, upstreamCap, res.hung) {
			<-h.arrived
		}
		row.held = int(h.inflight.Load())
	} else {
		clk.Advance(2 * time.Hour)
	}
	served := make([]bool, len(names))
	row.last, _ = release(len(names), func(i int) error {
		cctx, cancel := context.WithTimeout(ctx, res.deadline)
		defer cancel()
		r, err := s.client(i).GetAccessToken(cctx, &pb.GetAccessTokenRequest{Name: names[i]})
		served[i] = err == nil && r.GetAccessToken() != ""
		return nil
	})
	for _, ok := range served {
		if ok {
			row.served++
		} else {
			row.failed++
		}
	}
	close(unblock)
	hungCalls.Wait()
	return row, nil
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
