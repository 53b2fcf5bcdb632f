package broker

import (
	"context"
	"errors"
	"math/rand/v2"
	"net/http"
	"net/url"
	"strings"
	"time"

	"tokenbroker/storage"
)

// GetAccessToken returns a token valid for at least minValid. A token held
// in memory is returned without I/O and without shared locks. Otherwise the
// caller joins the connection's one shared refresh and waits for it within
// ctx; abandoning the wait never cuts the refresh.
//
// rejected, when set, is a token Acumatica just answered 401 for: unless a
// newer token is already held, one refresh runs for every caller reporting
// it.
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
	if s := c.snap.Load(); s.usable(now, minValid) && (rejected == "" || rejected != s.tok.AccessToken) {
		b.opts.Observer.CacheLookup(true)
		return s.tok, nil
	}
	b.opts.Observer.CacheLookup(false)
	return b.slowToken(ctx, c, minValid, rejected)
}

// touch records use, writing only when the stored second changed so that
// many callers do not fight over the cache line.
func (c *conn) touch(now time.Time) {
	n := now.UnixNano()
	if old := c.lastUsed.Load(); n-old > int64(time.Second) {
		c.lastUsed.Store(n)
	}
}

func (b *Broker) slowToken(ctx context.Context, c *conn, minValid time.Duration, rejected string) (Token, error) {
	joined := false
	var flightErr error
	for {
		now := b.now()
		c.mu.Lock()
		if c.deleted {
			c.mu.Unlock()
			return Token{}, &Error{Kind: ErrNotFound, Reason: ReasonConnectionNotFound, Name: c.name}
		}
		s := c.snap.Load()
		if rejected != "" && s.tok.AccessToken == rejected && !s.rejected {
			if cd := b.opts.RejectCooldown; cd > 0 && c.flight == nil && now.Sub(c.lastReject) < cd {
				// The token from the last report-triggered refresh is reported
				// again at once: refreshing again will not help.
				wait := cd - now.Sub(c.lastReject)
				c.mu.Unlock()
				e := newError(ErrUpstreamUnavailable, ReasonRejectedTooOften, c.name,
					"a fresh token was reported rejected again within %v; check the caller's instance URL and the integration user's role", cd)
				e.RetryAfter = wait
				return Token{}, e
			}
			r := *s
			r.rejected = true
			c.snap.Store(&r)
			s = &r
		}
		if s.usable(now, minValid) {
			c.mu.Unlock()
			return s.tok, nil
		}
		valid := s.usable(now, 0)
		if joined {
			// The shared refresh ended without a token that satisfies this
			// caller: serve a still-valid token, or say why not.
			err := flightErr
			c.mu.Unlock()
			if valid {
				return s.tok, nil
			}
			if err != nil {
				return Token{}, err
			}
			if s.tok.AccessToken != "" && !s.rejected && s.tok.ExpireTime.After(now) {
				return Token{}, newError(ErrTokenTooShort, ReasonTokenTooShort, c.name, "the newest token is valid for %v, less than the %v asked for", s.tok.ExpireTime.Sub(now).Round(time.Second), minValid)
			}
			return Token{}, newError(ErrUpstreamUnavailable, ReasonUpstreamUnavailable, c.name, "no valid token could be obtained")
		}
		if st := State(c.tok.State); st.halted() {
			c.mu.Unlock()
			if valid {
				return s.tok, nil
			}
			return Token{}, haltedError(c.name, st, c.tok.StateReason)
		}
		if c.flight == nil && now.Before(c.backoffUntil) {
			err := c.unavailable(now)
			c.mu.Unlock()
			if valid {
				return s.tok, nil
			}
			return Token{}, err
		}
		why := reasonCaller
		if rejected != "" {
			why = reasonRejected
			if c.flight == nil && s.rejected && s.tok.AccessToken == rejected {
				c.lastReject = now
			}
		}
		f := b.startFlightLocked(c, why)
		// A flight that has already committed a newer generation is only
		// finishing: if the token it issued is the one reported, it will
		// bring nothing newer. Wait for it to end, then start another.
		finishing := rejected != "" && c.tok.Generation > f.gen
		c.mu.Unlock()
		select {
		case <-f.done:
		case <-ctx.Done():
			return Token{}, ctx.Err()
		}
		if finishing {
			continue
		}
		joined = true
		flightErr = f.err
		// Most waiters find the new token: they take it without the mutex,
		// as the cached path does, rather than queueing on it one by one.
		if s := c.snap.Load(); s.usable(b.now(), minValid) && (rejected == "" || rejected != s.tok.AccessToken) {
			return s.tok, nil
		}
	}
}

// unavailable is the error for a connection in backoff. c.mu must be held.
func (c *conn) unavailable(now time.Time) error {
	reason := c.tok.LastErrorCode
	kind := ErrUpstreamUnavailable
	if reason == ReasonLoginLimit {
		kind = ErrLoginLimit
	}
	if reason == "" {
		reason = ReasonUpstreamUnavailable
	}
	e := newError(kind, reason, c.name, "upstream failing (%s); next attempt in %v", c.tok.LastErrorMessage, c.backoffUntil.Sub(now).Round(time.Second))
	e.RetryAfter = c.backoffUntil.Sub(now)
	return e
}

func haltedError(name string, st State, reason string) error {
	if st == StateRefreshTokenMissing {
		return newError(ErrRefreshTokenMissing, ReasonRefreshTokenMissing, name,
			"upstream issued no refresh token; add the offline_access scope to the Connected Application, then update the connection's credentials")
	}
	if reason == "" {
		reason = ReasonCredentialsRejected
	}
	return newError(ErrCredentialsRejected, reason, name,
		"connection needs re-authentication: upstream rejected the credentials; no upstream call is made until an operator updates them")
}

// startFlightLocked starts the connection's shared refresh, or returns the
// one in progress. c.mu must be held.
func (b *Broker) startFlightLocked(c *conn, why reason) *flight {
	if c.flight != nil {
		return c.flight
	}
	f := &flight{done: make(chan struct{}), why: why, gen: c.tok.Generation}
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
	ctx, cancel := context.WithTimeout(context.Background(), b.opts.RefreshTimeout)
	defer cancel()
	err := b.withTurn(ctx, c, func() error {
		// Another replica committed a new token since this flight was
		// decided on (seen through the watch or re-read under the lock):
		// that token serves, no upstream call.
		c.mu.Lock()
		gen := c.tok.Generation
		c.mu.Unlock()
		if gen > f.gen && f.why != reasonRenewChain {
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

// renew gets a new token from upstream for c. The caller holds c's turn.
func (b *Broker) renew(ctx context.Context, c *conn, why reason) error {
	forcePassword := why == reasonRenewChain
	passwordTried := false
	for attempt := 1; ; attempt++ {
		c.mu.Lock()
		if c.deleted {
			c.mu.Unlock()
			return &Error{Kind: ErrNotFound, Reason: ReasonConnectionNotFound, Name: c.name}
		}
		cfg := c.cfg.Clone()
		tok := c.tok.Clone()
		pending := c.pending
		c.mu.Unlock()

		if st := State(tok.State); st.halted() {
			return haltedError(c.name, st, tok.StateReason)
		}
		if pending != nil {
			// A rotated refresh token is only in memory: commit it before
			// anything else; the old one must never be used again.
			if err := b.commit(c, pending); err != nil {
				return err
			}
			return nil
		}
		grant := grantRefresh
		if tok.RefreshToken == "" || forcePassword {
			grant = grantPassword
		}
		if grant == grantPassword && passwordTried {
			// A password grant whose outcome is unknown may have opened a
			// session: do not sign in again within this refresh.
			wait := b.backoff(c.failureCount() + 1)
			b.noteFailure(c, ReasonUpstreamUnavailable, "password grant outcome unknown; not repeated within this refresh", wait)
			e := newError(ErrUpstreamUnavailable, ReasonUpstreamUnavailable, c.name, "password grant outcome unknown; retrying later")
			e.RetryAfter = wait
			return e
		}

		// Record the intent durably before the irreversible call. If even
		// that fails, do not call upstream.
		intent := tok.Clone()
		intent.IntentGeneration = tok.Generation
		intent.IntentGrant = grant
		intent.IntentTime = b.now()
		if err := b.store.PutTokens(context.Background(), c.name, intent); err != nil {
			b.stats.CommitFailures.Add(1)
			b.noteFailure(c, ReasonStorageFailure, "cannot record refresh intent: "+storageMessage(err), b.backoff(c.failureCount()+1))
			return storageError(c.name, err)
		}
		c.mu.Lock()
		c.tok.IntentGeneration, c.tok.IntentGrant, c.tok.IntentTime = intent.IntentGeneration, intent.IntentGrant, intent.IntentTime
		c.mu.Unlock()

		if grant == grantPassword {
			passwordTried = true
		}
		resp, err := b.exchange(ctx, cfg, grant, tok.RefreshToken)
		if resp != nil && (err == nil || resp.RefreshToken != "") {
			next := b.rotate(intent, cfg, grant, resp, err == nil)
			if cerr := b.commit(c, next); cerr != nil {
				return cerr
			}
			if grant == grantPassword && (tok.RefreshToken != "" || tok.AccessToken != "") {
				// The old chain's session still holds a seat: sign it out.
				b.signOutAsync(cfg, tok.RefreshToken, tok.AccessToken)
			}
			if err == nil {
				c.mu.Lock()
				c.recovering = false
				c.failures = 0
				c.backoffUntil = time.Time{}
				c.mu.Unlock()
				if next.State == string(StateRefreshTokenMissing) {
					b.log.Warn("upstream issued no refresh token", "connection", c.name)
				}
				b.log.Info("token issued", "connection", c.name, "grant", grant, "expires_in", int64(resp.ExpiresIn/time.Second))
				return nil
			}
		}
		var ue *upstreamError
		if !errors.As(err, &ue) {
			return err
		}
		switch {
		case ue.class == classInvalidGrant && grant == grantRefresh:
			// The refresh token lapsed, was revoked or was reused: drop it
			// and fall back to one password grant.
			dead := intent.Clone()
			dead.RefreshToken = ""
			dead.IntentGrant = ""
			setError(dead, ReasonRefreshTokenRevoked, ue.Error(), b.now())
			if cerr := b.commit(c, dead); cerr != nil {
				return cerr
			}
			b.log.Warn("refresh token rejected; falling back to one password grant", "connection", c.name)
			continue
		case ue.class == classInvalidGrant || ue.class == classInvalidClient:
			reasonCode := ReasonCredentialsRejected
			if ue.class == classInvalidClient {
				reasonCode = ReasonClientRejected
			}
			halted := intent.Clone()
			halted.IntentGrant = ""
			halted.State = string(StateNeedsReauth)
			halted.StateReason = reasonCode
			setError(halted, reasonCode, ue.Error(), b.now())
			if cerr := b.commit(c, halted); cerr != nil {
				// Keep the halt in memory at least: never retry a rejected password.
				c.mu.Lock()
				c.tok.State, c.tok.StateReason = halted.State, halted.StateReason
				c.publish()
				c.mu.Unlock()
			}
			b.log.Error("upstream rejected the credentials; connection needs re-authentication", "connection", c.name, "reason", reasonCode)
			return haltedError(c.name, StateNeedsReauth, reasonCode)
		case ue.class == classLoginLimit:
			wait := max(b.loginLimitBackoff(c.failureCount()+1), ue.retryAfter)
			b.noteFailure(c, ReasonLoginLimit, ue.Error(), wait)
			e := newError(ErrLoginLimit, ReasonLoginLimit, c.name, "the integration user's concurrent sign-ins are used up; sign other sessions out or raise the limit")
			e.RetryAfter = wait
			return e
		}
		// Transient: 5xx, 429, network, timeouts, unusable answers.
		reasonCode := ReasonUpstreamUnavailable
		if ue.status == 429 {
			reasonCode = ReasonUpstreamRateLimited
		} else if ue.class == classProtocol {
			reasonCode = ReasonUpstreamProtocol
		}
		wait := max(b.backoff(attempt), ue.retryAfter)
		deadline, _ := ctx.Deadline()
		if attempt < b.opts.MaxAttempts && time.Until(deadline) > wait && !b.closed.Load() {
			c.mu.Lock()
			setError(c.tok, reasonCode, ue.Error(), b.now())
			c.mu.Unlock()
			if grant == grantPassword && ue.class == classSafe {
				// Not processed upstream: no session was opened, so
				// signing in again is safe.
				passwordTried = false
			}
			if b.opts.Sleep(ctx, wait) == nil {
				continue
			}
		}
		wait = max(b.backoff(c.failureCount()+1), ue.retryAfter)
		b.noteFailure(c, reasonCode, ue.Error(), wait)
		e := newError(ErrUpstreamUnavailable, reasonCode, c.name, "%s", ue.Error())
		e.RetryAfter = wait
		return e
	}
}

// exchange sends one token request.
func (b *Broker) exchange(ctx context.Context, cfg *storage.Connection, grant, refreshToken string) (resp *tokenResponse, err error) {
	release, err := b.slots.acquire(ctx, cfg.InstanceURL)
	if err != nil {
		return nil, &upstreamError{class: classSafe, detail: "upstream cap: " + err.Error()}
	}
	defer release()
	ep := b.up.endpointsFor(ctx, cfg.InstanceURL)
	form := url.Values{
		"grant_type":    {grant},
		"client_id":     {cfg.ClientID},
		"client_secret": {cfg.ClientSecret},
	}
	if grant == grantPassword {
		form.Set("username", cfg.Username)
		form.Set("password", cfg.Password)
		form.Set("scope", strings.Join(cfg.Scopes, " "))
		b.stats.UpstreamPassword.Add(1)
	} else {
		form.Set("refresh_token", refreshToken)
		b.stats.UpstreamRefresh.Add(1)
	}
	began := time.Now()
	resp, err = b.up.tokenRequest(ctx, ep.token, form, []string{cfg.ClientSecret, cfg.Password, refreshToken})
	defer func() {
		outcome := "ok"
		var ue *upstreamError
		if errors.As(err, &ue) {
			outcome = ue.class.String()
		}
		b.opts.Observer.TokenRequest(grant, outcome, time.Since(began))
	}()
	if err != nil {
		b.stats.UpstreamFailures.Add(1)
		// A password grant opens a session: 429 on it means the user's
		// concurrent sign-ins (a licence limit) are used up.
		if ue, ok := err.(*upstreamError); ok && grant == grantPassword && ue.status == http.StatusTooManyRequests {
			ue.class = classLoginLimit
		}
	}
	return resp, err
}

// rotate builds the token state that follows a 200 answer. When usable is
// false only the rotated refresh token is taken from resp.
func (b *Broker) rotate(prev *storage.Tokens, cfg *storage.Connection, grant string, resp *tokenResponse, usable bool) *storage.Tokens {
	now := b.now()
	next := prev.Clone()
	next.IntentGrant = ""
	next.IntentGeneration = 0
	next.IntentTime = time.Time{}
	next.Generation = prev.Generation + 1
	switch {
	case resp.RefreshToken != "":
		next.RefreshToken = resp.RefreshToken
	case grant == grantRefresh:
		// RFC 6749 section 6: no new refresh token means the old one was
		// not rotated and stays valid.
	default:
		next.RefreshToken = ""
	}
	next.RefreshTokenUseTime = now
	if grant == grantPassword {
		next.ChainStartTime = now
	}
	if !usable {
		setError(next, ReasonUpstreamProtocol, "upstream answer unusable; its rotated refresh token was kept", now)
		return next
	}
	next.AccessToken = resp.AccessToken
	next.TokenType = "Bearer"
	next.IssueTime = now
	next.AccessTokenExpireTime = now.Add(resp.ExpiresIn)
	next.Scopes = resp.Scopes
	if len(next.Scopes) == 0 {
		next.Scopes = cfg.Scopes
	}
	next.State = string(StateActive)
	next.StateReason = ""
	if next.RefreshToken == "" {
		next.State = string(StateRefreshTokenMissing)
		next.StateReason = ReasonRefreshTokenMissing
	}
	return next
}

func setError(t *storage.Tokens, code, msg string, now time.Time) {
	t.LastErrorCode, t.LastErrorMessage, t.LastErrorTime = code, msg, now
}

// commit makes next durable, then publishes it. If the write fails, next is
// kept in memory as pending, the connection is DEGRADED, and the write is
// retried before any further upstream call.
func (b *Broker) commit(c *conn, next *storage.Tokens) error {
	err := b.store.PutTokens(context.Background(), c.name, next)
	c.mu.Lock()
	defer c.mu.Unlock()
	if errors.Is(err, storage.ErrNotFound) {
		c.deleted = true
		return &Error{Kind: ErrNotFound, Reason: ReasonConnectionNotFound, Name: c.name}
	}
	if err != nil {
		b.stats.CommitFailures.Add(1)
		c.pending = next
		c.failures++
		c.backoffUntil = b.now().Add(b.backoff(c.failures))
		c.tok.State = string(StateDegraded)
		setError(c.tok, ReasonStorageFailure, "cannot commit rotated token: "+storageMessage(err), b.now())
		c.publish()
		b.log.Error("commit of rotated token failed; will retry", "connection", c.name, "error", storageMessage(err))
		return storageError(c.name, err)
	}
	c.pending = nil
	c.tok = next
	c.publish()
	return nil
}

func storageMessage(err error) string {
	switch {
	case errors.Is(err, storage.ErrClosed):
		return "store closed"
	case errors.Is(err, storage.ErrNotFound):
		return "connection deleted"
	case errors.Is(err, storage.ErrLockLost):
		return "the connection's cluster lock lapsed before the write; another replica may hold it"
	}
	return err.Error()
}

func storageError(name string, err error) error {
	return newError(ErrStorage, ReasonStorageFailure, name, "durable store failed: %s", storageMessage(err))
}

// noteFailure records a failed refresh and starts a backoff.
func (b *Broker) noteFailure(c *conn, code, msg string, wait time.Duration) {
	now := b.now()
	c.mu.Lock()
	defer c.mu.Unlock()
	c.failures++
	c.backoffUntil = now.Add(wait)
	setError(c.tok, code, msg, now)
	if !State(c.tok.State).halted() {
		c.tok.State = string(StateDegraded)
		c.tok.StateReason = code
	}
	c.publish()
}

func (c *conn) failureCount() int {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.failures
}

// backoff is the wait before attempt n (1-based): exponential with equal
// jitter, capped.
func (b *Broker) backoff(n int) time.Duration {
	return jitter(b.opts.BackoffBase, b.opts.BackoffMax, n)
}

func (b *Broker) loginLimitBackoff(n int) time.Duration {
	return jitter(b.opts.LoginLimitBackoff, 30*time.Minute, n)
}

func jitter(base, ceiling time.Duration, n int) time.Duration {
	d := base
	for i := 1; i < n && d < ceiling; i++ {
		d *= 2
	}
	d = min(d, ceiling)
	half := d / 2
	return half + rand.N(half+1)
}

// signOutAsync revokes an old chain's refresh token and signs its session
// out, best effort, without holding up the caller.
func (b *Broker) signOutAsync(cfg *storage.Connection, refreshToken, accessToken string) {
	if refreshToken == "" && accessToken == "" {
		return
	}
	b.flights.Add(1)
	go func() {
		defer b.flights.Done()
		b.signOut(context.Background(), cfg, refreshToken, accessToken)
	}()
}

// signOut revokes a chain's refresh token and signs its session out, best
// effort, within 15 s whatever ctx says.
func (b *Broker) signOut(ctx context.Context, cfg *storage.Connection, refreshToken, accessToken string) {
	if refreshToken == "" && accessToken == "" {
		return
	}
	ctx, cancel := context.WithTimeout(context.WithoutCancel(ctx), 15*time.Second)
	defer cancel()
	release, err := b.slots.acquire(ctx, cfg.InstanceURL)
	if err != nil {
		return
	}
	defer release()
	b.up.revokeAndLogout(ctx, cfg.InstanceURL, cfg.ClientID, cfg.ClientSecret, refreshToken, accessToken)
}
