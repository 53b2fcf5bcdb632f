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
		if why := b.due(c, now); why != 0 {
			b.startFlightLocked(c, why)
		}
		c.mu.Unlock()
		return true
	})
}

// due says why c needs a refresh now, or 0. c.mu must be held.
func (b *Broker) due(c *conn, now time.Time) reason {
	if c.flight != nil || c.deleted || State(c.tok.State).halted() {
		return 0
	}
	if c.pending != nil {
		if now.Before(c.backoffUntil) {
			return 0
		}
		return reasonCommit
	}
	if now.Before(c.backoffUntil) {
		return 0
	}
	if c.recovering {
		return reasonRecover
	}
	t := c.tok
	lastUsed := time.Unix(0, c.lastUsed.Load())
	if t.AccessToken != "" && !t.IssueTime.IsZero() {
		life := t.AccessTokenExpireTime.Sub(t.IssueTime)
		// In use: asked for since the token was issued.
		if lastUsed.After(t.IssueTime) && !now.Before(t.IssueTime.Add(life*3/4)) {
			return reasonProactive
		}
	}
	if abs := c.cfg.AbsoluteLifetime; abs > 0 && !t.ChainStartTime.IsZero() {
		deadline := t.ChainStartTime.Add(abs)
		margin := min(abs/10, 48*time.Hour)
		quiet := now.Sub(lastUsed) >= quietFor
		if (!now.Before(deadline.Add(-margin)) && quiet) || !now.Before(deadline.Add(-margin/2)) {
			return reasonRenewChain
		}
	}
	if t.RefreshToken != "" && !t.RefreshTokenUseTime.IsZero() && !now.Before(t.RefreshTokenUseTime.Add(b.keepAlive(c.cfg))) {
		return reasonKeepAlive
	}
	return 0
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
