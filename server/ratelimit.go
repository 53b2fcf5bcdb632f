package server

import (
	"context"
	"errors"
	"sync"

	"golang.org/x/time/rate"
	"google.golang.org/grpc"
)

var errRateLimited = errors.New("server: caller rate limit exceeded")

// rateLimiter gives each caller identity its own token bucket
// (golang.org/x/time/rate). Buckets are created on first use and kept; the
// number of identities is bounded by the policy.
type rateLimiter struct {
	limit   rate.Limit
	burst   int
	who     func(context.Context) string
	buckets sync.Map // identity -> *rate.Limiter
}

func (l *rateLimiter) unary(ctx context.Context, req any, _ *grpc.UnaryServerInfo, handler grpc.UnaryHandler) (any, error) {
	id := l.who(ctx)
	v, ok := l.buckets.Load(id)
	if !ok {
		v, _ = l.buckets.LoadOrStore(id, rate.NewLimiter(l.limit, l.burst))
	}
	if !v.(*rate.Limiter).Allow() {
		return nil, toStatus(nil, errRateLimited)
	}
	return handler(ctx, req)
}
