package main

import (
	"context"
	"net/http"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"google.golang.org/grpc"
	"google.golang.org/protobuf/types/known/timestamppb"

	pb "tokenbroker/gen/tokenbroker/v1"

	"tokenbroker/broker"
	"tokenbroker/server/servertest"
)

// parking counts arrivals and, while armed with a gate, holds them until
// the gate opens: the parked herd holds the stand-in's token request with
// it, and the parked baseline holds no-op RPCs.
type parking struct {
	// answered is when a token request that arrived here was last
	// answered (Unix nanoseconds).
	answered atomic.Int64
	mu       sync.Mutex
	gate     chan struct{} // closed by open; nil: arrivals pass
	want     int
	arrived  int
	all      chan struct{} // closed when want arrivals were counted
}

// arm starts counting towards want; with hold, arrivals wait for open.
func (p *parking) arm(want int, hold bool) <-chan struct{} {
	p.mu.Lock()
	defer p.mu.Unlock()
	p.want, p.arrived, p.all, p.gate = want, 0, make(chan struct{}), nil
	if hold {
		p.gate = make(chan struct{})
	}
	return p.all
}

// arrive counts one arrival and returns the gate to wait on (nil: none).
func (p *parking) arrive() <-chan struct{} {
	p.mu.Lock()
	defer p.mu.Unlock()
	if p.all == nil {
		return nil
	}
	p.arrived++
	if p.arrived == p.want {
		close(p.all)
	}
	return p.gate
}

// open releases every held arrival and stops counting.
func (p *parking) open() {
	p.mu.Lock()
	defer p.mu.Unlock()
	if p.gate != nil {
		close(p.gate)
	}
	p.gate, p.all = nil, nil
}

// holdTokenRequests wraps the stand-in: token requests arrive at p.
func (p *parking) holdTokenRequests(next http.Handler) http.Handler {
	return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		if strings.HasSuffix(r.URL.Path, "/connect/token") {
			if g := p.arrive(); g != nil {
				<-g
			}
		}
		next.ServeHTTP(w, r)
		if strings.HasSuffix(r.URL.Path, "/connect/token") {
			p.answered.Store(time.Now().UnixNano())
		}
	})
}

// countMisses wraps an observer: cache misses arrive at p.
func (p *parking) countMisses(next broker.Observer) broker.Observer {
	return missObserver{next, p}
}

type missObserver struct {
	broker.Observer
	p *parking
}

func (o missObserver) CacheLookup(hit bool) {
	if !hit {
		o.p.arrive()
	}
	o.Observer.CacheLookup(hit)
}

// parkMethod is the parked baseline RPC: it decodes a GetAccessTokenRequest,
// arrives at the parking, and answers like GetAccessToken once released.
const parkMethod = "/tokenbroker.bench.Park/Token"

func (p *parking) register(s *grpc.Server, instanceURL string) {
	answer := &pb.GetAccessTokenResponse{
		AccessToken: "at-" + strings.Repeat("0", 48), TokenType: "Bearer", ExpireTime: timestamppb.Now(),
		InstanceUrl: instanceURL, Scopes: []string{"api", "offline_access"},
	}
	servertest.RegisterUnary(s, "tokenbroker.bench.Park", "Token", func() any { return new(pb.GetAccessTokenRequest) },
		func(ctx context.Context, _ any) (any, error) {
			if g := p.arrive(); g != nil {
				select {
				case <-g:
				case <-ctx.Done():
					return nil, ctx.Err()
				}
			}
			return answer, nil
		})
}
