package broker

import "time"

// Observer receives the broker's measurements (for metrics). Methods are
// called on hot paths and must not block.
type Observer interface {
	// TokenRequest reports one upstream token request: grant is
	// "password" or "refresh_token", outcome "ok" or a failure class.
	TokenRequest(grant, outcome string, d time.Duration)
	// CacheLookup reports whether GetAccessToken was served from memory.
	CacheLookup(hit bool)
}

type nopObserver struct{}

func (nopObserver) TokenRequest(string, string, time.Duration) {}
func (nopObserver) CacheLookup(bool)                           {}

// Census counts connections by state and lists client secret expiry times
// by connection name (only those that set one).
func (b *Broker) Census() (states map[State]int, secretExpiry map[string]time.Time) {
	states = map[State]int{StateActive: 0, StateDegraded: 0, StateNeedsReauth: 0, StateRefreshTokenMissing: 0}
	secretExpiry = map[string]time.Time{}
	b.conns.Range(func(_, v any) bool {
		c := v.(*conn)
		c.mu.Lock()
		states[c.stateLocked()]++
		if exp := c.cfg.ClientSecretExpireTime; !exp.IsZero() {
			secretExpiry[c.name] = exp
		}
		c.mu.Unlock()
		return true
	})
	return states, secretExpiry
}
