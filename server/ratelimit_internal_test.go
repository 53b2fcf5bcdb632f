package server

import (
	"context"
	"fmt"
	"testing"
	"time"

	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"
)

type identityKey struct{}

// Identities that come and go leave no buckets behind, and dropping idle
// buckets never gives a caller more than its limit.
func TestRateLimitBucketsOfIdleIdentitiesAreDropped(t *testing.T) {
	now := time.Unix(1_700_000_000, 0)
	l := &rateLimiter{
		limit: 1, burst: 2, now: func() time.Time { return now },
		who: func(ctx context.Context) string { return ctx.Value(identityKey{}).(string) },
	}
	call := func(id string) error {
		_, err := l.unary(context.WithValue(context.Background(), identityKey{}, id), nil, nil,
			func(context.Context, any) (any, error) { return nil, nil })
		return err
	}
	buckets := func() int {
		n := 0
		l.buckets.Range(func(any, any) bool { n++; return true })
		return n
	}
	for i := range 1000 {
		if err := call(fmt.Sprintf("spiffe://corp.example/pod/%d", i)); err != nil {
			t.Fatal(err)
		}
	}
	if got := buckets(); got != 1000 {
		t.Fatalf("buckets = %d, want 1000", got)
	}
	// A busy caller spends its burst just before the sweep.
	now = now.Add(2 * sweepEvery)
	busy := "spiffe://corp.example/svc/busy"
	for range 2 {
		if err := call(busy); err != nil {
			t.Fatal(err)
		}
	}
	now = now.Add(500 * time.Millisecond)
	// A new identity sweeps: the 1000 idle buckets are full and go; the
	// busy one is half a token from empty and stays, limit intact.
	if err := call("spiffe://corp.example/pod/new"); err != nil {
		t.Fatal(err)
	}
	if got := buckets(); got != 2 {
		t.Errorf("buckets after the sweep = %d, want 2 (busy and new)", got)
	}
	if err := call(busy); status.Code(err) != codes.ResourceExhausted {
		t.Errorf("busy caller after the sweep: %v, want RESOURCE_EXHAUSTED", err)
	}
	// Within the minute, new identities do not sweep again.
	now = now.Add(2 * sweepEvery)
	if err := call("spiffe://corp.example/pod/first-after"); err != nil {
		t.Fatal(err)
	}
	if err := call("spiffe://corp.example/pod/second-after"); err != nil {
		t.Fatal(err)
	}
	if got := buckets(); got != 2 {
		t.Errorf("buckets = %d, want 2: the sweep at the first new identity dropped busy and new", got)
	}
}
