package broker

import (
	"context"
	"time"

	"go.opentelemetry.io/otel/trace"
)

// GetAccessToken returns a token valid for at least minValid, or for the
// default of its lifetime when minValid is [MinValidDefault]. A token held
// in memory is returned without I/O and without shared locks. Otherwise the
// caller joins the connection's one shared refresh and waits for it within
// ctx; abandoning the wait never cuts the refresh.
//
// rejected, when set, is a token Acumatica just answered 401 for: unless a
// newer token is already held, one refresh runs for every caller reporting
// it.
//
// An explicit minValid above half the lifetime of the tokens upstream
// issues is too short: while a valid token is held it is answered with
// [ErrTokenTooShort] (reason TOKEN_LIFETIME_TOO_SHORT) and no refresh; once
// that token has expired, one refresh runs. Any other minValid is at most
// half the lifetime, so a refresh it triggers finds the held token at least
// half its lifetime old. Either way each token causes at most one refresh
// on callers' behalf, and callers cause at most two refreshes per lifetime.
func (b *Broker) GetAccessToken(ctx context.Context, name string, minValid time.Duration, rejected string) (Token, error) {
	var c *conn
	if v, ok := b.conns.Load(name); ok {
		c = v.(*conn)
	} else {
		var err error
		if c, err = b.lookup(name); err != nil {
			return Token{}, err
		}
	}
	now := b.now()
	c.touch(now)
	if s := c.snap.Load(); s.servable(now, minValid, rejected) {
		b.opts.Observer.CacheLookup(true)
		return s.tok, nil
	}
	b.opts.Observer.CacheLookup(false)
	return b.awaitToken(ctx, c, minValid, rejected)
}

// decision is what a caller gets on the slow path: a token, an error, or a
// shared refresh to wait for.
type decision struct {
	tok  Token
	err  error
	wait *flight
	// finishing: wait is a flight that already committed the token this
	// caller reports rejected; after it ends, decide again rather than
	// settle for what it brought.
	finishing bool
}

// awaitToken is the slow path: decide under c.mu what the caller gets and,
// when that is a shared refresh, wait for it within ctx and decide again.
func (b *Broker) awaitToken(ctx context.Context, c *conn, minValid time.Duration, rejected string) (Token, error) {
	var joined *flight
	for {
		d := b.decide(ctx, c, minValid, rejected, joined)
		if d.wait == nil {
			return d.tok, d.err
		}
		select {
		case <-d.wait.done:
		case <-ctx.Done():
			return Token{}, ctx.Err()
		}
		if d.finishing {
			continue
		}
		joined = d.wait
		// Most waiters find the new token: they take it without the mutex,
		// as the cached path does, rather than queueing on it one by one.
		if s := c.snap.Load(); s.servable(b.now(), minValid, rejected) {
			return s.tok, nil
		}
	}
}

// decide says what a caller asking for minValid gets now. joined is the
// shared refresh it already waited for, if any; ctx carries its trace.
func (b *Broker) decide(ctx context.Context, c *conn, minValid time.Duration, rejected string, joined *flight) decision {
	now := b.now()
	c.mu.Lock()
	defer c.mu.Unlock()
	if c.deleted {
		return decision{err: notFound(c.name)}
	}
	if err := b.takeReportLocked(c, now, rejected); err != nil {
		return decision{err: err}
	}
	s := c.snap.Load()
	if s.usable(now, minValid) {
		return decision{tok: s.tok}
	}
	if joined != nil {
		return c.afterFlightLocked(s, now, minValid, joined.err)
	}
	if d, ok := c.withoutRefreshLocked(s, now, minValid); ok {
		return d
	}
	return b.joinLocked(ctx, c, s, now, rejected)
}

// takeReportLocked takes a caller's report that the held token was answered
// 401: it is not served again. The token from the last report-triggered
// refresh reported again at once is refused instead: refreshing again will
// not help, and a caller must not turn into a refresh storm.
func (b *Broker) takeReportLocked(c *conn, now time.Time, rejected string) error {
	s := c.snap.Load()
	if rejected == "" || s.tok.AccessToken != rejected || s.rejected {
		return nil
	}
	if cd := b.opts.RejectCooldown; cd > 0 && c.flight == nil && now.Sub(c.rt.lastReject) < cd {
		e := newError(ErrUpstreamUnavailable, ReasonRejectedTooOften, c.name,
			"a fresh token was reported rejected again within %v; check the caller's instance URL and the integration user's role", cd)
		e.RetryAfter = cd - now.Sub(c.rt.lastReject)
		return e
	}
	c.rejectedLocked()
	return nil
}

// afterFlightLocked answers a caller whose shared refresh ended without a
// token that meets its minValid: a still-valid token serves (the upstream
// is failing), unless no token of this lifetime could; else say why not.
func (c *conn) afterFlightLocked(s *snapshot, now time.Time, minValid time.Duration, flightErr error) decision {
	valid := s.usable(now, 0)
	switch {
	case valid && c.tooShortLocked(minValid):
		return decision{err: tooShortError(c.name, c.lifetimeLocked(), minValid)}
	case valid:
		return decision{tok: s.tok}
	case flightErr != nil:
		return decision{err: flightErr}
	}
	return decision{err: newError(ErrUpstreamUnavailable, ReasonUpstreamUnavailable, c.name, "no valid token could be obtained")}
}

// withoutRefreshLocked answers a caller without a refresh when one must not
// or cannot help: the connection is halted, in backoff, or its tokens live
// shorter than minValid. A still-valid token serves while halted or in
// backoff.
func (c *conn) withoutRefreshLocked(s *snapshot, now time.Time, minValid time.Duration) (decision, bool) {
	valid := s.usable(now, 0)
	var err error
	switch {
	case c.haltedLocked():
		err = haltedError(c.name, c.stateLocked(), c.stateReasonLocked())
	case c.flight == nil && c.inBackoffLocked(now):
		err = c.unavailableLocked(now)
	case valid && c.tooShortLocked(minValid):
		return decision{err: tooShortError(c.name, c.lifetimeLocked(), minValid)}, true
	default:
		return decision{}, false
	}
	if valid {
		return decision{tok: s.tok}, true
	}
	return decision{err: err}, true
}

// joinLocked starts the shared refresh, or joins the one in progress.
func (b *Broker) joinLocked(ctx context.Context, c *conn, s *snapshot, now time.Time, rejected string) decision {
	why := triggerCaller
	if rejected != "" {
		why = triggerRejected
		if c.flight == nil && s.rejected && s.tok.AccessToken == rejected {
			c.reportRefreshLocked(now)
		}
	}
	f := b.startFlightLocked(ctx, c, why)
	// A flight that has already committed a newer generation is only
	// finishing: if the token it issued is the one reported, it will bring
	// nothing newer. Wait for it to end, then start another.
	return decision{wait: f, finishing: rejected != "" && c.committed.Generation > f.gen}
}

// lifetimeLocked is the lifetime upstream gave the held access token, 0
// when unknown.
func (c *conn) lifetimeLocked() time.Duration {
	t := c.committed
	if t.AccessToken == "" || t.IssueTime.IsZero() {
		return 0
	}
	return t.AccessTokenExpireTime.Sub(t.IssueTime)
}

// tooShortLocked reports whether minValid is above half the held token's
// lifetime. Such a request is refused rather than served by refreshing:
// a fresh token of that lifetime meets it only until it is half its
// lifetime old, and a minValid just below the lifetime would refresh on
// nearly every call (with 15-minute tokens and 14m58s, once every two
// seconds). Half keeps every refresh a caller triggers at a token age of at
// least half the lifetime.
func (c *conn) tooShortLocked(minValid time.Duration) bool {
	life := c.lifetimeLocked()
	return life > 0 && minValid > life/2
}

// startFlightLocked starts the connection's shared refresh, or returns the
// one in progress. The trace in ctx (of the caller that starts it) is the
// parent of its upstream requests' spans. c.mu must be held.
func (b *Broker) startFlightLocked(ctx context.Context, c *conn, why trigger) *flight {
	if c.flight != nil {
		return c.flight
	}
	f := &flight{done: make(chan struct{}), why: why, gen: c.committed.Generation, parent: trace.SpanContextFromContext(ctx)}
	c.flight = f
	b.flights.Add(1)
	go b.runFlight(c, f)
	return f
}

// runFlight runs a shared refresh on the broker's own context: a caller that
// gives up must not cut a request whose answer carries the only copy of the
// next refresh token.
func (b *Broker) runFlight(c *conn, f *flight) {
	defer b.flights.Done()
	ctx, cancel := context.WithTimeout(trace.ContextWithSpanContext(context.Background(), f.parent), b.opts.RefreshTimeout)
	defer cancel()
	err := b.withTurn(ctx, c, func() error {
		// Another replica committed a new token since this flight was
		// decided on (seen through the watch or re-read under the lock):
		// that token serves, no upstream call.
		c.mu.Lock()
		gen := c.committed.Generation
		c.mu.Unlock()
		if gen > f.gen && f.why != triggerRenewChain {
			return nil
		}
		return b.renew(ctx, c, f.why)
	})
	if err != nil {
		b.log.Warn("token refresh failed", "connection", c.name, "error", err.Error())
	}
	c.mu.Lock()
	f.err = err
	c.flight = nil
	c.mu.Unlock()
	close(f.done)
}
