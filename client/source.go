package client

import (
	"context"
	"errors"
	"math"
	"sync"
	"sync/atomic"
	"time"

	"golang.org/x/oauth2"
	"google.golang.org/protobuf/types/known/durationpb"
	"google.golang.org/protobuf/types/known/timestamppb"

	pb "tokenbroker/gen/tokenbroker/v1"
)

// source is the cache of one connection's token at one margin. The token
// is read with one atomic load and one reading of the monotonic clock; the
// mutex is taken only when the cache cannot serve.
type source struct {
	c        *Client
	key      sourceKey
	cur      atomic.Pointer[cached] // the newest token known; nil before the first
	watching atomic.Bool            // the watch runs (or is starting)
	lastUsed atomic.Int64           // when a token was last asked for, on the client's clock (a time.Duration)

	mu      sync.Mutex       // guards the fields below, and every store to cur
	calls   map[string]*call // GetAccessToken calls in flight, by the token they report ("" for none)
	fail    error            // the last call's error, while retryAt is ahead
	retryAt time.Time        // no call before this (the broker's RetryInfo)
	bad     string           // the token last reported rejected: never cached again
}

// cached is a token with the time, on the client's clock, until which it
// is valid for the margin: the cached path reads the clock once and
// compares.
type cached struct {
	tok        *oauth2.Token
	freshUntil time.Duration // since Client.epoch
}

// call is one GetAccessToken call that every caller with the same miss
// waits for; tok and err are set before done is closed.
type call struct {
	done chan struct{}
	tok  *oauth2.Token
	err  error
}

// Token returns a token valid for at least the margin: from memory while
// the cached one is, else from one GetAccessToken call shared by every
// goroutine that missed at the same time.
func (s *source) Token() (*oauth2.Token, error) {
	if e := s.cur.Load(); e != nil {
		if now := s.c.elapsed(); now < e.freshUntil {
			s.used(now)
			return e.tok, nil
		}
	}
	return s.get(context.Background(), "")
}

// token is Token for a request that has a context.
func (s *source) token(ctx context.Context) (*oauth2.Token, error) {
	if e := s.cur.Load(); e != nil {
		if now := s.c.elapsed(); now < e.freshUntil {
			s.used(now)
			return e.tok, nil
		}
	}
	return s.get(ctx, "")
}

// used notes a use at now, cheaply: the cached path stores the time only
// when the last one is older than a sixteenth of the idle timeout, and
// otherwise only reads, so that goroutines on many cores do not fight over
// the cache line.
func (s *source) used(now time.Duration) {
	idle := s.c.opts.idle
	if !s.watching.Load() || (idle > 0 && now-time.Duration(s.lastUsed.Load()) > idle/16) {
		s.touch(now)
	}
}

// touch notes a use at now and starts the watch if it is not running. The
// watch, when it stops for idleness, clears watching before it looks at
// lastUsed again, and touch stores lastUsed before it looks at watching:
// one of them sees the other, so a use as the watch stops restarts it.
func (s *source) touch(now time.Duration) {
	s.lastUsed.Store(int64(now))
	if !s.watching.Load() && s.watching.CompareAndSwap(false, true) {
		s.c.startWatch(s)
	}
}

// idle says whether s has gone unused for the idle timeout, and for how
// long it has been unused.
func (s *source) idle() (bool, time.Duration) {
	d := s.c.elapsed() - time.Duration(s.lastUsed.Load())
	return s.c.opts.idle > 0 && d >= s.c.opts.idle, d
}

// get returns a token valid for the margin and, when rejected is set, other
// than rejected: the cached one if it now is, else the answer of the one
// call for this miss, made or joined. The call runs on the client's context,
// so a caller that gives up through ctx does not cut it for the others.
func (s *source) get(ctx context.Context, rejected string) (*oauth2.Token, error) {
	s.touch(s.c.elapsed())
	tok, cl, err := s.decide(rejected)
	if cl == nil {
		return tok, err
	}
	select {
	case <-cl.done:
		return cl.tok, cl.err
	case <-ctx.Done():
		return nil, ctx.Err()
	}
}

// decide says, under the mutex, what a miss gets: the cached token if it
// now serves, the broker's last error while its RetryInfo lasts, or the
// call to wait for.
func (s *source) decide(rejected string) (*oauth2.Token, *call, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	e := s.cur.Load()
	if e != nil && s.c.elapsed() < e.freshUntil && e.tok.AccessToken != rejected {
		return e.tok, nil, nil
	}
	if rejected != "" {
		// Acumatica refused it: serve it no more, even if a stream that
		// started earlier brings it now.
		s.bad = rejected
		if e != nil && e.tok.AccessToken == rejected {
			s.cur.Store(nil)
		}
	}
	switch {
	case s.c.ctx.Err() != nil:
		return nil, nil, ErrClosed
	case s.c.opts.now().Before(s.retryAt):
		return nil, nil, s.fail
	}
	return nil, s.callLocked(rejected), nil
}

// callLocked returns the call in flight for rejected, starting it if there
// is none. A plain miss joins any call in flight: each brings a token valid
// for the margin.
func (s *source) callLocked(rejected string) *call {
	if cl, ok := s.calls[rejected]; ok {
		return cl
	}
	if rejected == "" {
		for _, cl := range s.calls {
			return cl
		}
	}
	cl := &call{done: make(chan struct{})}
	s.calls[rejected] = cl
	go s.run(cl, rejected)
	return cl
}

// run makes one GetAccessToken call, caches its token and wakes its waiters.
func (s *source) run(cl *call, rejected string) {
	ctx, cancel := context.WithTimeout(s.c.ctx, s.c.opts.callTimeout)
	defer cancel()
	resp, err := s.c.api.GetAccessToken(ctx, &pb.GetAccessTokenRequest{
		Name: s.key.name, MinValidFor: durationpb.New(s.key.minValid), RejectedAccessToken: rejected,
	})
	if err == nil {
		cl.tok = toToken(resp.GetAccessToken(), resp.GetTokenType(), resp.GetExpireTime(), resp.GetInstanceUrl(), resp.GetScopes())
		s.offer(cl.tok)
	} else if s.c.ctx.Err() != nil {
		err = ErrClosed
	} else {
		err = fromRPC(s.key.name, err)
	}
	cl.err = err
	s.mu.Lock()
	delete(s.calls, rejected)
	var e *Error
	if errors.As(err, &e) && e.RetryAfter > 0 {
		s.fail, s.retryAt = err, s.c.opts.now().Add(e.RetryAfter)
	} else if err == nil {
		s.fail, s.retryAt = nil, time.Time{}
	}
	s.mu.Unlock()
	close(cl.done)
}

// offer caches t unless the cache already holds it or a newer token (one
// that expires later: a call's answer and a stream's push may cross), or t
// was reported rejected.
func (s *source) offer(t *oauth2.Token) {
	// Under the mutex: a report (in get) must not slip between the check
	// of bad and the store.
	s.mu.Lock()
	defer s.mu.Unlock()
	old := s.cur.Load()
	if s.bad == t.AccessToken || (old != nil && (old.tok.AccessToken == t.AccessToken || old.tok.Expiry.After(t.Expiry))) {
		return
	}
	s.cur.Store(&cached{tok: t, freshUntil: s.c.elapsed() + t.Expiry.Sub(s.c.opts.now()) - s.key.minValid})
}

// watch keeps the cache fresh from WatchAccessToken, reconnecting with
// backoff when the stream fails, until ctx ends, s goes unused for the idle
// timeout, or the connection is not found (deleted): the next use starts
// it again. While it is down the cache serves what it holds and misses
// fall back to GetAccessToken.
func (s *source) watch(ctx context.Context) {
	for {
		notFound := s.watchWhileUsed(ctx)
		if ctx.Err() != nil {
			return // closed: nothing starts a watch again
		}
		s.watching.Store(false)
		// A use that came as the watch stopped for idleness may have seen
		// watching still set: take over its start.
		if idle, _ := s.idle(); notFound || idle || !s.watching.CompareAndSwap(false, true) {
			return
		}
	}
}

// watchWhileUsed follows streams until ctx ends, s goes unused, or a
// stream ends with NOT_FOUND, which it reports.
func (s *source) watchWhileUsed(ctx context.Context) (notFound bool) {
	ctx, stop := s.untilIdle(ctx)
	defer stop()
	failures := 0
	for {
		got, err := s.follow(ctx)
		if ctx.Err() != nil {
			return false
		}
		if got {
			failures = 0
		}
		failures++
		err = fromRPC(s.key.name, err)
		var floor time.Duration
		var e *Error
		if errors.As(err, &e) {
			floor = e.RetryAfter
		}
		if errors.Is(err, ErrNotFound) {
			s.mu.Lock()
			s.cur.Store(nil) // a deleted connection's tokens were revoked
			s.mu.Unlock()
			return true
		}
		if terminal(err) {
			// Halted or not allowed: only an operator can change that.
			// Look again at the slowest pace.
			floor = max(floor, s.c.opts.backoffMax)
		}
		t := time.NewTimer(s.c.opts.backoff(failures, floor))
		select {
		case <-t.C:
		case <-ctx.Done():
			t.Stop()
			return false
		}
	}
}

// untilIdle returns a context that also ends once s has gone unused for
// the idle timeout, and the function that releases it.
func (s *source) untilIdle(ctx context.Context) (context.Context, func()) {
	ctx, cancel := context.WithCancel(ctx)
	if s.c.opts.idle <= 0 {
		return ctx, cancel
	}
	// Made stopped and then reset, so that check sees t set.
	var t *time.Timer
	check := func() {
		idle, unused := s.idle()
		if idle {
			cancel()
			return
		}
		t.Reset(s.c.opts.idle - unused)
	}
	t = time.AfterFunc(time.Duration(math.MaxInt64), check)
	t.Reset(s.c.opts.idle)
	return ctx, func() { t.Stop(); cancel() }
}

// follow reads one stream until it fails; got says whether it brought any
// token.
func (s *source) follow(ctx context.Context) (got bool, err error) {
	ctx, cancel := context.WithCancel(ctx)
	defer cancel()
	st, err := s.c.api.WatchAccessToken(ctx, &pb.WatchAccessTokenRequest{Name: s.key.name, MinValidFor: durationpb.New(s.key.minValid)})
	if err != nil {
		return false, err
	}
	for {
		m, err := st.Recv()
		if err != nil {
			return got, err
		}
		got = true
		s.offer(toToken(m.GetAccessToken(), m.GetTokenType(), m.GetExpireTime(), m.GetInstanceUrl(), m.GetScopes()))
	}
}

// toToken builds the token callers get, with the instance URL and scopes
// as extras.
func toToken(access, typ string, expire *timestamppb.Timestamp, instanceURL string, scopes []string) *oauth2.Token {
	t := &oauth2.Token{AccessToken: access, TokenType: typ, Expiry: expire.AsTime()}
	return t.WithExtra(map[string]any{"instance_url": instanceURL, "scopes": scopes})
}
