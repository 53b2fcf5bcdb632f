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

// LapseWindow is how far ahead [Broker.Census] reports refresh token
// lapses: a chain further from lapsing is not listed, so healthy
// connections add nothing to a scrape.
const LapseWindow = 7 * 24 * time.Hour

// Kinds of refresh token lapse in [Lapse].
const (
	// LapseIdle: the sliding window ends unless the token is used.
	LapseIdle = "idle"
	// LapseAbsolute: the chain's absolute lifetime ends.
	LapseAbsolute = "absolute"
)

// Census is a count of the broker's connections for metrics: only what is
// unusual is listed by name, so its size follows the trouble, not the
// number of connections.
type Census struct {
	// States counts connections by state (every state present, zero or not).
	States map[State]int
	// SecretExpiry is when each client secret expires, for connections
	// that set one.
	SecretExpiry map[string]time.Time
	// Unhealthy lists the connections that are not ACTIVE.
	Unhealthy []Unhealthy
	// Lapses lists refresh token chains that lapse within [LapseWindow].
	Lapses []Lapse
}

// Unhealthy is a connection that is not ACTIVE, with the reason code of its
// state (as its last error's ErrorInfo reason).
type Unhealthy struct {
	Name   string
	State  State
	Reason string
}

// Lapse is when a connection's refresh token chain lapses, by kind
// ([LapseIdle] or [LapseAbsolute]).
type Lapse struct {
	Name string
	Kind string
	At   time.Time
}

// Census counts connections by state and lists the unusual ones: client
// secret expiry times, connections that are not ACTIVE, and refresh token
// chains that lapse within [LapseWindow].
func (b *Broker) Census() Census {
	out := Census{
		States:       map[State]int{StateActive: 0, StateDegraded: 0, StateNeedsReauth: 0, StateRefreshTokenMissing: 0},
		SecretExpiry: map[string]time.Time{},
	}
	horizon := b.now().Add(LapseWindow)
	b.conns.Range(func(_, v any) bool {
		c := v.(*conn)
		c.mu.Lock()
		defer c.mu.Unlock()
		st := c.stateLocked()
		out.States[st]++
		if exp := c.cfg.ClientSecretExpireTime; !exp.IsZero() {
			out.SecretExpiry[c.name] = exp
		}
		if st != StateActive {
			out.Unhealthy = append(out.Unhealthy, Unhealthy{Name: c.name, State: st, Reason: c.unhealthyReasonLocked()})
		}
		out.Lapses = b.appendLapsesLocked(out.Lapses, c, horizon)
		return true
	})
	return out
}

// unhealthyReasonLocked is the reason code behind a state that is not
// ACTIVE: the state's own reason, else the last error's code.
func (c *conn) unhealthyReasonLocked() string {
	if r := c.stateReasonLocked(); r != "" {
		return r
	}
	return c.lastErrorLocked().code
}

// appendLapsesLocked appends to dst when c's refresh token lapses if
// unused (idle) and when its chain reaches its absolute lifetime, each
// only when it is no later than horizon; nothing without a refresh token.
func (b *Broker) appendLapsesLocked(dst []Lapse, c *conn, horizon time.Time) []Lapse {
	idle, abs := b.lapseTimesLocked(c)
	if !idle.IsZero() && !idle.After(horizon) {
		dst = append(dst, Lapse{Name: c.name, Kind: LapseIdle, At: idle})
	}
	if !abs.IsZero() && !abs.After(horizon) {
		dst = append(dst, Lapse{Name: c.name, Kind: LapseAbsolute, At: abs})
	}
	return dst
}

// lapseTimesLocked is when c's refresh token lapses if unused (idle) and
// when its chain reaches its absolute lifetime; zero when not known or
// not held.
func (b *Broker) lapseTimesLocked(c *conn) (idle, abs time.Time) {
	t := c.newestLocked()
	if t.RefreshToken == "" {
		return time.Time{}, time.Time{}
	}
	if !t.RefreshTokenUseTime.IsZero() {
		idle = t.RefreshTokenUseTime.Add(b.sliding(c.cfg))
	}
	if d := c.cfg.AbsoluteLifetime; d > 0 && !t.ChainStartTime.IsZero() {
		abs = t.ChainStartTime.Add(d)
	}
	return idle, abs
}
