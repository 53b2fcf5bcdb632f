package broker

import (
	"time"

	"tokenbroker/storage"
)

// State is a connection's state.
type State string

// States of a connection. DEGRADED is runtime state, never stored.
const (
	StateActive              State = "ACTIVE"
	StateDegraded            State = "DEGRADED"
	StateNeedsReauth         State = "NEEDS_REAUTH"
	StateRefreshTokenMissing State = "REFRESH_TOKEN_MISSING"
)

// halted reports whether the state forbids upstream token requests until an
// operator updates the connection.
func (s State) halted() bool { return s == StateNeedsReauth || s == StateRefreshTokenMissing }

// Token is an access token handed to callers.
type Token struct {
	AccessToken string
	TokenType   string
	ExpireTime  time.Time
	InstanceURL string
	Scopes      []string
}

// snapshot is the immutable view the cached path reads without locks.
type snapshot struct {
	tok      Token
	state    State
	rejected bool // a caller reported tok rejected by Acumatica
	suspect  bool // a refresh lost in a crash may have revoked tok
}

// usable reports whether the token may be handed out with at least minValid
// left.
func (s *snapshot) usable(now time.Time, minValid time.Duration) bool {
	return s.tok.AccessToken != "" && !s.rejected && !s.suspect && s.tok.ExpireTime.Sub(now) >= minValid
}

// servable reports whether the token may be handed out to a caller asking
// for minValid that reported rejected (if set) answered 401.
func (s *snapshot) servable(now time.Time, minValid time.Duration, rejected string) bool {
	return s.usable(now, minValid) && (rejected == "" || rejected != s.tok.AccessToken)
}

// Status is what the broker knows of a connection's token chain.
type Status struct {
	LastErrorCode              string
	LastErrorMessage           string
	LastErrorTime              time.Time
	LastRefreshTime            time.Time
	AccessTokenExpireTime      time.Time
	HasRefreshToken            bool
	RefreshTokenIdleExpireTime time.Time
	ChainStartTime             time.Time
	StateReason                string
	Warnings                   []string
}

// View is a connection as read APIs show it. Conn has its secrets cleared.
type View struct {
	Conn            *storage.Connection
	ClientSecretSet bool
	PasswordSet     bool
	State           State
	Status          Status
	ETag            string
}
