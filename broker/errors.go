package broker

import (
	"errors"
	"fmt"
	"strconv"
	"time"
)

// Error kinds, checked with errors.Is. Every error the broker returns for a
// connection wraps one of them in an [*Error] with more detail.
var (
	// ErrNotFound: no such connection.
	ErrNotFound = errors.New("broker: connection not found")
	// ErrAlreadyExists: a connection with that name exists.
	ErrAlreadyExists = errors.New("broker: connection already exists")
	// ErrConflict: the etag does not match (the connection changed).
	ErrConflict = errors.New("broker: connection changed since read")
	// ErrInvalidArgument: the input breaks a rule; see [*Error.Violations].
	ErrInvalidArgument = errors.New("broker: invalid argument")
	// ErrCredentialsRejected: upstream rejected the client or the user.
	ErrCredentialsRejected = errors.New("broker: credentials rejected by upstream")
	// ErrRefreshTokenMissing: upstream issued no refresh token.
	ErrRefreshTokenMissing = errors.New("broker: upstream issued no refresh token")
	// ErrUpstreamUnavailable: upstream failed and no valid token is held.
	ErrUpstreamUnavailable = errors.New("broker: upstream unavailable")
	// ErrLoginLimit: the integration user's concurrent sign-ins are used up.
	ErrLoginLimit = errors.New("broker: upstream login limit reached")
	// ErrStorage: the durable store failed; no upstream call was made that
	// could lose a refresh token.
	ErrStorage = errors.New("broker: storage failure")
	// ErrTokenTooShort: the freshest token cannot satisfy min_valid_for.
	ErrTokenTooShort = errors.New("broker: token lifetime shorter than requested")
	// ErrAuthorization: an authorization cannot be completed (unknown,
	// used or expired state; a code or imported token upstream refused).
	ErrAuthorization = errors.New("broker: authorization failed")
	// ErrClosed: the broker is shutting down.
	ErrClosed = errors.New("broker: closed")
)

// Reasons name error classes for operators and machines (ErrorInfo reason,
// ConnectionStatus.state_reason, last_error.code).
const (
	ReasonCredentialsRejected = "CREDENTIALS_REJECTED"
	ReasonClientRejected      = "CLIENT_REJECTED"
	ReasonRefreshTokenRevoked = "REFRESH_TOKEN_REVOKED"
	ReasonRefreshTokenMissing = "REFRESH_TOKEN_MISSING"
	ReasonUpstreamUnavailable = "UPSTREAM_UNAVAILABLE"
	ReasonUpstreamRateLimited = "UPSTREAM_RATE_LIMITED"
	ReasonUpstreamProtocol    = "UPSTREAM_PROTOCOL_ERROR"
	// ReasonUpstreamAddressRefused: the instance's address is inside the
	// network and not allowed (see [UpstreamRules]).
	ReasonUpstreamAddressRefused = "UPSTREAM_ADDRESS_REFUSED"
	ReasonLoginLimit             = "LOGIN_LIMIT_REACHED"
	ReasonStorageFailure         = "STORAGE_FAILURE"
	ReasonConnectionNotFound     = "CONNECTION_NOT_FOUND"
	ReasonAlreadyExists          = "CONNECTION_ALREADY_EXISTS"
	ReasonEtagMismatch           = "ETAG_MISMATCH"
	ReasonInvalidArgument        = "INVALID_ARGUMENT"
	ReasonTokenTooShort          = "TOKEN_LIFETIME_TOO_SHORT"
	ReasonCrashRecovery          = "RECOVERING_AFTER_CRASH"
	ReasonRejectedTooOften       = "TOKEN_REJECTED_TOO_OFTEN"
	// ReasonAuthorizationRequired: an authorization-code connection's chain
	// ended (NEEDS_REAUTH); an operator must authorize it again.
	ReasonAuthorizationRequired = "AUTHORIZATION_REQUIRED"
	// ReasonAuthorizationInvalid: CompleteAuthorization's state is unknown,
	// used, expired or for another connection.
	ReasonAuthorizationInvalid = "AUTHORIZATION_STATE_INVALID"
	// ReasonCodeRejected: upstream refused the authorization code.
	ReasonCodeRejected = "AUTHORIZATION_CODE_REJECTED"
	// ReasonImportRejected: upstream refused an imported refresh token.
	ReasonImportRejected = "REFRESH_TOKEN_REJECTED"
)

// FieldViolation names a bad input field.
type FieldViolation struct {
	Field       string
	Description string
}

// Error is the broker's error: a kind, a reason, the connection, and for
// retryable failures how long to wait. Messages never carry secrets.
type Error struct {
	Kind       error
	Reason     string
	Name       string
	Message    string
	RetryAfter time.Duration
	Violations []FieldViolation
}

// Error reads `broker: <what> "<name>": <why>`.
func (e *Error) Error() string {
	msg := e.Kind.Error()
	if e.Name != "" {
		msg += " " + strconv.Quote(e.Name)
	}
	if e.Message != "" {
		msg += ": " + e.Message
	}
	return msg
}

// Unwrap returns the kind.
func (e *Error) Unwrap() error { return e.Kind }

func newError(kind error, reason, name, format string, args ...any) *Error {
	return &Error{Kind: kind, Reason: reason, Name: name, Message: fmt.Sprintf(format, args...)}
}

// invalid builds an ErrInvalidArgument error from violations.
func invalid(violations ...FieldViolation) *Error {
	e := &Error{Kind: ErrInvalidArgument, Reason: ReasonInvalidArgument, Violations: violations}
	if len(violations) > 0 {
		e.Message = violations[0].Field + ": " + violations[0].Description
	}
	return e
}

// notFound is the error for a connection that does not exist (or no
// longer).
func notFound(name string) *Error {
	return &Error{Kind: ErrNotFound, Reason: ReasonConnectionNotFound, Name: name}
}

// haltedError is the error for a connection in a halted state: no upstream
// call is made until an operator updates it.
func haltedError(name string, st State, reason string) *Error {
	if st == StateRefreshTokenMissing {
		return newError(ErrRefreshTokenMissing, ReasonRefreshTokenMissing, name,
			"upstream issued no refresh token; add the offline_access scope to the Connected Application, then update the connection's credentials")
	}
	if reason == ReasonAuthorizationRequired {
		return newError(ErrCredentialsRejected, reason, name,
			"connection needs authorization: its refresh token chain ended and it has no password to sign in with; no upstream call is made until an operator completes StartAuthorization and CompleteAuthorization again, or imports a refresh token")
	}
	if reason == "" {
		reason = ReasonCredentialsRejected
	}
	return newError(ErrCredentialsRejected, reason, name,
		"connection needs re-authentication: upstream rejected the credentials; no upstream call is made until an operator updates them")
}

// unavailableLocked is the error for a connection in backoff after failed
// refreshes. c.mu must be held.
func (c *conn) unavailableLocked(now time.Time) *Error {
	last := c.lastErrorLocked()
	reason, kind := last.code, ErrUpstreamUnavailable
	switch reason {
	case ReasonLoginLimit:
		kind = ErrLoginLimit
	case ReasonUpstreamAddressRefused:
		kind = ErrAddressRefused
	}
	if reason == "" {
		reason = ReasonUpstreamUnavailable
	}
	wait := c.rt.backoffUntil.Sub(now)
	e := newError(kind, reason, c.name, "upstream failing (%s); next attempt in %v", last.message, wait.Round(time.Second))
	e.RetryAfter = wait
	return e
}

// tooShortError is the error for a request whose min_valid_for is above
// half this connection's token lifetime. The limit is half: a caller asking
// for that causes at most two refreshes per lifetime, and none while
// maintenance renews tokens in use at 75% of their life.
func tooShortError(name string, lifetime, minValid time.Duration) *Error {
	return newError(ErrTokenTooShort, ReasonTokenTooShort, name,
		"upstream issues tokens that live %v; %v asked for is more than half of that; ask for at most %v", lifetime, minValid, lifetime/2)
}

// alreadyExists is the error for a name already taken (or being created).
func alreadyExists(name, why string) *Error {
	return &Error{Kind: ErrAlreadyExists, Reason: ReasonAlreadyExists, Name: name, Message: why}
}
