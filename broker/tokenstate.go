package broker

import (
	"time"

	"tokenbroker/storage"
)

// The token states the broker writes are built here, by pure functions of
// the state before and what happened. Each starts from a durable record
// (never from runtime state), so what is written is only what must survive
// a restart.

// withIntent is prev with the intent to send grant recorded: written before
// the irreversible upstream call.
func withIntent(prev *storage.Tokens, grant string, now time.Time) *storage.Tokens {
	next := prev.Clone()
	next.IntentGeneration = prev.Generation
	next.IntentGrant = grant
	next.IntentTime = now
	return next
}

// withoutIntent is prev with no request in flight.
func withoutIntent(prev *storage.Tokens) *storage.Tokens {
	next := prev.Clone()
	next.IntentGrant = ""
	next.IntentGeneration = 0
	next.IntentTime = time.Time{}
	return next
}

// rotate builds the token state that follows a 200 answer. When usable is
// false only the rotated refresh token is taken from resp.
func rotate(prev *storage.Tokens, cfg *storage.Connection, grant string, resp *tokenResponse, usable bool, now time.Time) *storage.Tokens {
	next := withoutIntent(prev)
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

// withoutRefreshToken is intent after upstream rejected its refresh token
// (lapsed, revoked or reused): the next grant is a password grant. It is a
// new generation, so other replicas stop holding the dead refresh token.
func withoutRefreshToken(intent *storage.Tokens, msg string, now time.Time) *storage.Tokens {
	next := withoutIntent(intent)
	next.Generation = intent.Generation + 1
	next.RefreshToken = ""
	setError(next, ReasonRefreshTokenRevoked, msg, now)
	return next
}

// halted is intent after upstream rejected the client or the user: no
// upstream call until an operator updates the connection.
func halted(intent *storage.Tokens, reason, msg string, now time.Time) *storage.Tokens {
	next := withoutIntent(intent)
	next.State = string(StateNeedsReauth)
	next.StateReason = reason
	setError(next, reason, msg, now)
	return next
}

// abandoned is prev after its refresh token, which may have been spent (a
// crash, or an answer that left the outcome unknown), was given up: neither
// it nor the access token the lost refresh may have revoked is used again.
// code and msg say why. It is a new generation, so other replicas take it
// too (they only take newer generations) instead of serving a signed-out
// token or presenting the spent refresh token.
func abandoned(prev *storage.Tokens, code, msg string, now time.Time) *storage.Tokens {
	next := withoutIntent(prev)
	next.Generation = prev.Generation + 1
	next.RefreshToken = ""
	next.AccessToken = ""
	next.AccessTokenExpireTime = time.Time{}
	setError(next, code, msg, now)
	return next
}

func setError(t *storage.Tokens, code, msg string, now time.Time) {
	t.LastErrorCode, t.LastErrorMessage, t.LastErrorTime = code, msg, now
}
