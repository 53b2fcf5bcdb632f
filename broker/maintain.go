package broker

import (
	"context"
	"time"

	"tokenbroker/storage"
)

// quietFor is how long a connection must have gone unused for a chain
// renewal to count as happening at a quiet moment.
const quietFor = 5 * time.Minute

// Maintain starts the shared refreshes that are due: tokens in use past 75%
// of their lifetime, idle refresh tokens nearing their sliding window,
// chains nearing their absolute lifetime, crash recovery, and failed
// commits. It does not wait for them.
func (b *Broker) Maintain() {
	if b.closed.Load() {
		return
	}
	now := b.now()
	b.conns.Range(func(_, v any) bool {
		c := v.(*conn)
		c.mu.Lock()
		if why := b.dueLocked(c, now); why != 0 {
			b.startFlightLocked(context.Background(), c, why)
		}
		c.mu.Unlock()
		return true
	})
	b.events.scan(now)
}

// dueLocked says why c needs a refresh now, or 0. c.mu must be held.
func (b *Broker) dueLocked(c *conn, now time.Time) trigger {
	switch {
	case c.flight != nil || c.deleted || c.inBackoffLocked(now):
		return 0
	case c.rt.pending != nil:
		return triggerCommit
	case c.haltedLocked():
		return 0
	case c.rt.recovering:
		return triggerRecover
	}
	lastUsed := time.Unix(0, c.lastUsed.Load())
	switch t := c.committed; {
	case inUsePastThreeQuarters(t, lastUsed, now):
		return triggerProactive
	case chainNearsItsEnd(t, c.cfg.AbsoluteLifetime, lastUsed, now):
		return triggerRenewChain
	case t.RefreshToken != "" && !t.RefreshTokenUseTime.IsZero() && !now.Before(t.RefreshTokenUseTime.Add(b.keepAlive(c.cfg))):
		return triggerKeepAlive
	}
	return 0
}

// inUsePastThreeQuarters reports whether a token asked for since it was
// issued has passed 75% of its lifetime: it is renewed ahead, in
// proportion to its lifetime, so callers almost never wait.
func inUsePastThreeQuarters(t *storage.Tokens, lastUsed, now time.Time) bool {
	if t.AccessToken == "" || t.IssueTime.IsZero() {
		return false
	}
	life := t.AccessTokenExpireTime.Sub(t.IssueTime)
	return lastUsed.After(t.IssueTime) && !now.Before(t.IssueTime.Add(life*3/4))
}

// chainMargin is how long before a chain's absolute lifetime ends the
// broker starts renewing it at a quiet moment: a quarter of the lifetime, at
// most 5 days. Renewal is forced at four fifths of the margin (4 days for
// lifetimes of 20 days or more), so such a chain comes within 3 days of its
// end, where the alert on tokenbroker_refresh_token_lapse_seconds fires,
// only when renewal is failing. Renewing early costs one sign-in a chain,
// as renewing late does.
func chainMargin(abs time.Duration) time.Duration { return min(abs/4, 5*24*time.Hour) }

// chainNearsItsEnd reports whether a chain with an absolute lifetime is
// within its margin at a quiet moment, or within four fifths of it at any
// moment.
func chainNearsItsEnd(t *storage.Tokens, abs time.Duration, lastUsed, now time.Time) bool {
	if abs <= 0 || t.ChainStartTime.IsZero() {
		return false
	}
	deadline := t.ChainStartTime.Add(abs)
	margin := chainMargin(abs)
	quiet := now.Sub(lastUsed) >= quietFor
	return (!now.Before(deadline.Add(-margin)) && quiet) || !now.Before(deadline.Add(-margin*4/5))
}

// keepAlive is how long a refresh token may sit unused before the broker
// refreshes it: KeepAliveAfter, at most half the sliding lifetime.
func (b *Broker) keepAlive(cfg *storage.Connection) time.Duration {
	return min(b.opts.KeepAliveAfter, b.sliding(cfg)/2)
}

// sliding is the connection's refresh token sliding lifetime.
func (b *Broker) sliding(cfg *storage.Connection) time.Duration {
	if cfg.SlidingLifetime > 0 {
		return cfg.SlidingLifetime
	}
	return b.opts.DefaultSlidingLifetime
}
