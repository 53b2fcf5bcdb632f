package server

import (
	"context"
	"errors"
	"sync"
	"sync/atomic"
	"time"

	"golang.org/x/time/rate"
	"google.golang.org/grpc"
)

var errRateLimited = errors.New("server: caller rate limit exceeded")

// sweepEvery is how often, at most, idle buckets are dropped.
const sweepEvery = time.Minute

// rateLimiter gives each caller identity its own token bucket
// (golang.org/x/time/rate). Buckets are created on first use. Policy
// identities are globs, so the identities seen are not bounded by the
// policy (a CA may issue one per pod): when a new identity arrives, at most
// once a minute, the buckets that have refilled are dropped. A full bucket
// allows exactly what the new one that replaces it will, so dropping it
// changes no caller's limit.
type rateLimiter struct {
	limit     rate.Limit
	burst     int
	who       func(context.Context) string
	now       func() time.Time // default time.Now
	buckets   sync.Map         // identity -> *rate.Limiter
	lastSweep atomic.Int64     // unix nanoseconds
}

func (l *rateLimiter) unary(ctx context.Context, req any, _ *grpc.UnaryServerInfo, handler grpc.UnaryHandler) (any, error) {
	now := l.clock()
	if !l.bucket(l.who(ctx), now).AllowN(now, 1) {
		return nil, toStatus(nil, errRateLimited)
	}
	return handler(ctx, req)
}

func (l *rateLimiter) clock() time.Time {
	if l.now != nil {
		return l.now()
	}
	return time.Now()
}

// bucket returns id's bucket, making it (and sweeping) on first use.
func (l *rateLimiter) bucket(id string, now time.Time) *rate.Limiter {
	if v, ok := l.buckets.Load(id); ok {
		return v.(*rate.Limiter)
	}
	l.sweep(now)
	v, _ := l.buckets.LoadOrStore(id, rate.NewLimiter(l.limit, l.burst))
	return v.(*rate.Limiter)
}

// sweep drops every full bucket, unless it swept less than sweepEvery ago.
func (l *rateLimiter) sweep(now time.Time) {
	last := l.lastSweep.Load()
	if now.UnixNano()-last < int64(sweepEvery) || !l.lastSweep.CompareAndSwap(last, now.UnixNano()) {
		return
	}
	l.buckets.Range(func(id, v any) bool {
		if v.(*rate.Limiter).TokensAt(now) >= float64(l.burst) {
			// A call that took a token between the check and the delete
			// gets it back with the new bucket: at most one per sweep.
			l.buckets.CompareAndDelete(id, v)
		}
		return true
	})
}
