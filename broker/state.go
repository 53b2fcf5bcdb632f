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

// DefaultMinValid is the validity a caller that asks for none
// ([MinValidDefault]) gets, for tokens that live at least four times as
// long.
const DefaultMinValid = 60 * time.Second

// MinValidDefault, or any negative minValid, asks [Broker.GetAccessToken]
// for the default validity: [DefaultMinValid], or a quarter of the lifetime
// of the tokens upstream issues when that is shorter. A token then serves
// until 75% of its life, when maintenance renews tokens in use anyway, so
// such a caller causes about one refresh per lifetime and is never answered
// TOKEN_LIFETIME_TOO_SHORT, however short the tokens live.
const MinValidDefault time.Duration = -1

// defaultMinValid is the validity [MinValidDefault] stands for with tokens
// of lifetime life (0 when unknown).
func defaultMinValid(life time.Duration) time.Duration {
	if life <= 0 {
		return DefaultMinValid
	}
	return min(DefaultMinValid, life/4)
}

// snapshot is the immutable view the cached path reads without locks.
type snapshot struct {
	tok        Token
	state      State
	rejected   bool          // a caller reported tok rejected by Acumatica
	suspect    bool          // a refresh lost in a crash may have revoked tok
	defaultMin time.Duration // what MinValidDefault stands for with tok's lifetime
}

// need is the validity a caller asking for minValid needs of tok: minValid,
// or for [MinValidDefault] the default for tok's lifetime.
func (s *snapshot) need(minValid time.Duration) time.Duration {
	if minValid < 0 {
		return s.defaultMin
	}
	return minValid
}

// usable reports whether the token may be handed out with at least minValid
// left ([MinValidDefault]: the default for its lifetime).
func (s *snapshot) usable(now time.Time, minValid time.Duration) bool {
	return s.tok.AccessToken != "" && !s.rejected && !s.suspect && s.tok.ExpireTime.Sub(now) >= s.need(minValid)
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
