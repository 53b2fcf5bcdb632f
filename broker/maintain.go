package broker

import (
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
			b.startFlightLocked(c, why)
		}
		c.mu.Unlock()
		return true
	})
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

// chainNearsItsEnd reports whether a chain with an absolute lifetime is
// within its last tenth (at most 48 h) at a quiet moment, or within half
// of that at any moment.
func chainNearsItsEnd(t *storage.Tokens, abs time.Duration, lastUsed, now time.Time) bool {
	if abs <= 0 || t.ChainStartTime.IsZero() {
		return false
	}
	deadline := t.ChainStartTime.Add(abs)
	margin := min(abs/10, 48*time.Hour)
	quiet := now.Sub(lastUsed) >= quietFor
	return (!now.Before(deadline.Add(-margin)) && quiet) || !now.Before(deadline.Add(-margin/2))
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
