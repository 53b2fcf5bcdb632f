package broker

import (
	"cmp"
	"context"
	"errors"
	"math/rand/v2"
	"net/url"
	"strings"
	"time"

	"tokenbroker/storage"
)

// renew gets a new token from upstream for c. The caller holds c's turn.
// Each attempt: prepare (deleted, halted, a pending commit, a refresh token
// a crash may have spent) → choose the grant → record the intent durably →
// exchange → take the answer → handle the failure (retry, fall back to a
// password grant, give up a refresh token the failure may have spent, halt,
// or back off).
func (b *Broker) renew(ctx context.Context, c *conn, why trigger) error {
	g := grantPolicy{forcePassword: why == triggerRenewChain}
	for attempt := 1; ; attempt++ {
		cfg, tok, done, err := b.prepareRenewal(ctx, c)
		if done {
			return err
		}
		g.noPassword = isAuthCode(cfg)
		grant, ok := g.next(tok)
		if !ok {
			return b.passwordOutcomeUnknown(c)
		}
		if grant == grantNone {
			return b.authorizationRequired(c, tok)
		}
		intent, err := b.recordIntent(c, tok, grant)
		if err != nil {
			return err
		}
		resp, upErr := b.exchange(ctx, cfg, grant, tok.RefreshToken)
		if done, err := b.takeAnswer(c, cfg, tok, intent, grant, resp, upErr); done {
			return err
		}
		if retry, err := b.afterFailure(ctx, c, &g, intent, grant, attempt, upErr); !retry {
			return err
		}
	}
}

// prepareRenewal reads what an attempt starts from and settles what must
// come before any upstream call: a deleted or halted connection ends the
// renewal, a commit that failed is retried instead of a call (the old
// refresh token must never be used again), and a refresh token a crash may
// have spent is given up.
func (b *Broker) prepareRenewal(ctx context.Context, c *conn) (cfg *storage.Connection, tok *storage.Tokens, done bool, err error) {
	c.mu.Lock()
	deleted, pending, suspect := c.deleted, c.rt.pending, c.suspectLocked()
	isHalted, state, reason := c.haltedLocked(), c.stateLocked(), c.stateReasonLocked()
	cfg, tok = c.cfg.Clone(), c.committed.Clone()
	c.mu.Unlock()
	switch {
	case deleted:
		return nil, nil, true, notFound(c.name)
	case pending != nil:
		return nil, nil, true, b.commit(c, pending, true)
	case isHalted:
		return nil, nil, true, haltedError(c.name, state, reason)
	case suspect && !isAuthCode(cfg):
		// An authorization-code chain is presented once more instead (see
		// "A suspect chain" in authcode.go).
		tok, err = b.abandonSpentChain(ctx, c, cfg, tok, ReasonCrashRecovery, "a refresh was in flight when the broker stopped")
		return cfg, tok, err != nil, err
	}
	return cfg, tok, false, nil
}

// abandonSpentChain gives up a refresh token the broker may have spent: it
// presented it just before it stopped (why says so). Presenting it again could look like
// token theft to an identity server with reuse detection (RFC 9700 section
// 4.14.2), which then revokes the whole family. So it is revoked (harmless
// if spent) and its session signed out, freeing the session's seat, then
// dropped durably together with the access token the lost refresh may have
// revoked; the renewal signs in again with one password grant.
func (b *Broker) abandonSpentChain(ctx context.Context, c *conn, cfg *storage.Connection, tok *storage.Tokens, code, why string) (*storage.Tokens, error) {
	b.log.Warn("refresh token may have been spent; revoking it and signing in again", "connection", c.name, "why", why)
	b.signOut(ctx, cfg, tok.RefreshToken, tok.AccessToken)
	next := abandoned(tok, code, why+"; its refresh token was revoked rather than presented again", b.now())
	if err := b.commit(c, next, false); err != nil {
		return nil, err
	}
	return next, nil
}

// grantPolicy chooses the grant of each attempt of one renewal.
type grantPolicy struct {
	forcePassword bool // the chain is renewed: sign in again
	passwordTried bool // a password grant of this renewal may have opened a session
	noPassword    bool // an authorization-code connection: refresh grants only
}

// next is the grant for an attempt from tok; ok is false when that would be
// a second password grant whose predecessor's outcome is unknown, and grant
// is grantNone when no grant is left (a dead authorization-code chain).
func (g *grantPolicy) next(tok *storage.Tokens) (grant string, ok bool) {
	if tok.RefreshToken != "" && (!g.forcePassword || g.noPassword) {
		return grantRefresh, true
	}
	if g.noPassword {
		return grantNone, true
	}
	if g.passwordTried {
		return grantPassword, false
	}
	g.passwordTried = true
	return grantPassword, true
}

// passwordOutcomeUnknown ends a renewal rather than sign in twice: a
// password grant whose outcome is unknown may have opened a session.
func (b *Broker) passwordOutcomeUnknown(c *conn) error {
	wait := b.backoff(c.failureCount() + 1)
	b.failed(c, ReasonUpstreamUnavailable, "password grant outcome unknown; not repeated within this refresh", wait)
	e := newError(ErrUpstreamUnavailable, ReasonUpstreamUnavailable, c.name, "password grant outcome unknown; retrying later")
	e.RetryAfter = wait
	return e
}

// recordIntent makes durable, before the irreversible call, that grant is
// about to be sent from tok: after a crash the broker can tell "the refresh
// token may be spent" from "nothing happened". If even that write fails, no
// upstream call is made.
func (b *Broker) recordIntent(c *conn, tok *storage.Tokens, grant string) (*storage.Tokens, error) {
	intent := withIntent(tok, grant, b.now())
	// Not the flight's ctx: a durable write is not abandoned half-way for a
	// deadline (the store then cannot say what happened). The bbolt write
	// ends with its fsync; an etcd write has no deadline of its own here.
	if err := b.store.PutTokens(context.Background(), c.name, intent); err != nil {
		b.stats.CommitFailures.Add(1)
		b.failed(c, ReasonStorageFailure, "cannot record refresh intent: "+storageMessage(err), b.backoff(c.failureCount()+1))
		return nil, storageError(c.name, err)
	}
	c.mu.Lock()
	c.intentLocked(intent)
	c.mu.Unlock()
	return intent, nil
}

// takeAnswer commits a 200 answer: the new token state, or of an otherwise
// unusable answer only its rotated refresh token. done says the renewal is
// over, with err; otherwise the failure is handled as any other.
func (b *Broker) takeAnswer(c *conn, cfg *storage.Connection, tok, intent *storage.Tokens, grant string, resp *tokenResponse, upErr error) (done bool, err error) {
	if resp == nil || (upErr != nil && resp.RefreshToken == "") {
		return false, nil
	}
	usable := upErr == nil
	next := rotate(intent, cfg, grant, resp, usable, b.now())
	if err := b.commit(c, next, usable); err != nil {
		return true, err
	}
	if grant == grantPassword {
		// The old chain's session still holds a seat: sign it out, now that
		// the new chain is durable, and revoke a refresh token set aside.
		b.signOutAsync(cfg, cmp.Or(tok.RefreshToken, c.takeSetAside()), tok.AccessToken)
	}
	if !usable {
		return false, nil
	}
	if next.State == string(StateRefreshTokenMissing) {
		b.log.Warn("upstream issued no refresh token", "connection", c.name)
	}
	b.log.Info("token issued", "connection", c.name, "grant", grant, "expires_in", int64(resp.ExpiresIn/time.Second))
	return true, nil
}

// afterFailure handles a failed attempt: it says whether to try again and
// otherwise returns the renewal's error.
func (b *Broker) afterFailure(ctx context.Context, c *conn, g *grantPolicy, intent *storage.Tokens, grant string, attempt int, upErr error) (retry bool, err error) {
	var ue *upstreamError
	if !errors.As(upErr, &ue) {
		return false, upErr
	}
	switch ue.class {
	case classInvalidGrant, classInvalidClient:
		if ue.reason() == ReasonRefreshTokenRevoked {
			return b.dropRefreshToken(c, intent, ue)
		}
		return false, b.halt(c, intent, ue)
	case classSafe, classLoginLimit, classAddressRefused:
		// Upstream certainly did not process the request.
		if err := b.forgetIntent(c, intent); err != nil {
			return false, err
		}
		if ue.class != classSafe {
			return false, b.giveUp(c, ue, b.notRetriedWait(c, ue))
		}
	case classAmbiguous:
		// An authorization-code chain is presented once more instead, as
		// after a crash (see "A suspect chain" in authcode.go).
		if grant == grantRefresh && !c.authCode() {
			if err := b.setAsideSpentRefreshToken(c, intent, ue); err != nil {
				return false, err
			}
		}
	}
	return b.retryOrGiveUp(ctx, c, g, grant, attempt, ue)
}

// notRetriedWait is the backoff after a failure that retrying within the
// refresh cannot help: a used-up login limit, a refused address.
func (b *Broker) notRetriedWait(c *conn, ue *upstreamError) time.Duration {
	n := c.failureCount() + 1
	if ue.class == classLoginLimit {
		return max(b.loginLimitBackoff(n), ue.retryAfter)
	}
	return b.backoff(n)
}

// setAsideSpentRefreshToken ends the chain whose refresh token an
// ambiguous answer (a timeout or reset after sending, 500, 502, 504) may
// have spent: the token is dropped durably, so it is never presented again
// within this process or after a restart. The access token stays and is
// served while it lasts, as in any upstream outage: the next attempt, or
// the next renewal, signs in with one password grant, and only once that
// new chain is committed are the set-aside token revoked and the old
// session signed out (takeAnswer). New token first, then sign-out: callers
// are served throughout and the old seat is freed right after. After a
// crash, recovery cannot tell whether the lost refresh revoked the access
// token, so it gives up both (abandonSpentChain).
func (b *Broker) setAsideSpentRefreshToken(c *conn, intent *storage.Tokens, ue *upstreamError) error {
	why := ue.Error() + " after the refresh token was sent, so it may have been spent; it is revoked rather than presented again"
	b.log.Warn("refresh token may have been spent; setting it aside and signing in again", "connection", c.name, "why", ue.Error())
	c.setAside(intent.RefreshToken)
	// A failed commit stays pending and is retried before any upstream
	// call, so the token is not presented meanwhile either.
	return b.commit(c, withoutRefreshToken(intent, why, b.now()), false)
}

// forgetIntent durably clears the intent of an attempt upstream certainly
// did not process (refused, 503, 429, the upstream cap): its refresh token
// is not spent, and a restart must not take it for one a crash may have
// spent.
func (b *Broker) forgetIntent(c *conn, intent *storage.Tokens) error {
	return b.commit(c, withoutIntent(intent), false)
}

// retryOrGiveUp ends a transient failure (5xx, 429, network, timeouts,
// unusable answers): another attempt after a backoff while the shared
// refresh may make one, else the renewal's error.
func (b *Broker) retryOrGiveUp(ctx context.Context, c *conn, g *grantPolicy, grant string, attempt int, ue *upstreamError) (retry bool, err error) {
	wait := max(b.backoff(attempt), ue.retryAfter)
	if b.mayRetry(ctx, attempt, wait) {
		b.attemptFailed(c, ue.reason(), ue.Error())
		if grant == grantPassword && ue.class == classSafe {
			// Not processed upstream: no session was opened, so signing in
			// again is safe.
			g.passwordTried = false
		}
		if b.opts.Sleep(ctx, wait) == nil {
			return true, nil
		}
	}
	return false, b.giveUp(c, ue, max(b.backoff(c.failureCount()+1), ue.retryAfter))
}

// mayRetry reports whether a shared refresh may make another attempt after
// waiting wait.
func (b *Broker) mayRetry(ctx context.Context, attempt int, wait time.Duration) bool {
	deadline, _ := ctx.Deadline()
	return attempt < b.opts.MaxAttempts && time.Until(deadline) > wait && !b.closed.Load()
}

// dropRefreshToken forgets a refresh token upstream rejected (lapsed,
// revoked or reused) and lets the renewal fall back to one password grant.
func (b *Broker) dropRefreshToken(c *conn, intent *storage.Tokens, ue *upstreamError) (bool, error) {
	if err := b.commit(c, withoutRefreshToken(intent, ue.Error(), b.now()), false); err != nil {
		return false, err
	}
	if !c.authCode() {
		b.log.Warn("refresh token rejected; falling back to one password grant", "connection", c.name)
	}
	return true, nil
}

// halt stops upstream calls for c until an operator updates it: upstream
// rejected the client or the user. If the halt cannot be committed it is
// kept in memory as pending: a rejected password is never retried.
func (b *Broker) halt(c *conn, intent *storage.Tokens, ue *upstreamError) error {
	reason := ue.reason()
	_ = b.commit(c, halted(intent, reason, ue.Error(), b.now()), false)
	b.log.Error("upstream rejected the credentials; connection needs re-authentication", "connection", c.name, "reason", reason)
	return haltedError(c.name, StateNeedsReauth, reason)
}

// giveUp ends a renewal on an upstream failure; c backs off for wait.
func (b *Broker) giveUp(c *conn, ue *upstreamError, wait time.Duration) error {
	b.failed(c, ue.reason(), ue.Error(), wait)
	return ue.toError(c.name, wait)
}

// failed records a failed shared refresh on c.
func (b *Broker) failed(c *conn, code, msg string, wait time.Duration) {
	c.mu.Lock()
	defer c.mu.Unlock()
	c.failedLocked(code, msg, wait, b.now())
}

// attemptFailed records one failed attempt the shared refresh retries.
func (b *Broker) attemptFailed(c *conn, code, msg string) {
	c.mu.Lock()
	defer c.mu.Unlock()
	c.attemptFailedLocked(code, msg, b.now())
}

// exchange sends one token request.
func (b *Broker) exchange(ctx context.Context, cfg *storage.Connection, grant, refreshToken string) (*tokenResponse, error) {
	form := url.Values{
		"grant_type":    {grant},
		"client_id":     {cfg.ClientID},
		"client_secret": {cfg.ClientSecret},
	}
	sent := &b.stats.UpstreamRefresh
	if grant == grantPassword {
		form.Set("username", cfg.Username)
		form.Set("password", cfg.Password)
		form.Set("scope", strings.Join(cfg.Scopes, " "))
		sent = &b.stats.UpstreamPassword
	} else {
		form.Set("refresh_token", refreshToken)
	}
	return b.postToken(ctx, cfg, grant, form, sent, []string{cfg.ClientSecret, cfg.Password, refreshToken})
}

// commit makes next durable, then takes it: as a success (failures,
// backoff and DEGRADED end) when success is set. If the write fails, next
// is kept in memory as pending, the connection is DEGRADED, and the write
// is retried before any further upstream call.
func (b *Broker) commit(c *conn, next *storage.Tokens, success bool) error {
	// Not the flight's ctx, as in recordIntent: next may carry the only copy
	// of a rotated refresh token.
	err := b.store.PutTokens(context.Background(), c.name, next)
	c.mu.Lock()
	defer c.mu.Unlock()
	switch {
	case errors.Is(err, storage.ErrNotFound):
		c.markDeletedLocked()
		return notFound(c.name)
	case err != nil:
		b.stats.CommitFailures.Add(1)
		c.pendingLocked(next, "cannot commit rotated token: "+storageMessage(err), b.backoff(c.rt.failures+1), b.now())
		b.log.Error("commit of rotated token failed; will retry", "connection", c.name, "error", storageMessage(err))
		return storageError(c.name, err)
	case success:
		c.succeededLocked(next)
	default:
		c.committedLocked(next)
	}
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

// backoff is the wait before attempt n (1-based): exponential with equal
// jitter, capped.
func (b *Broker) backoff(n int) time.Duration {
	return jitter(b.opts.BackoffBase, b.opts.BackoffMax, n)
}

func (b *Broker) loginLimitBackoff(n int) time.Duration {
	return jitter(b.opts.LoginLimitBackoff, 30*time.Minute, n)
}

// jitter is base doubled n-1 times, capped at ceiling, then drawn from its
// upper half ("equal jitter"): always within [d/2, d].
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
	ctx, cancel := context.WithTimeout(withConnName(context.WithoutCancel(ctx), cfg.Name), 15*time.Second)
	defer cancel()
	release, err := b.slots.acquire(ctx, cfg.InstanceURL)
	if err != nil {
		return
	}
	defer release()
	b.up.revokeAndLogout(ctx, cfg.InstanceURL, cfg.ClientID, cfg.ClientSecret, refreshToken, accessToken)
}
