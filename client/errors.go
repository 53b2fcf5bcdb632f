package client

import (
	"context"
	"errors"
	"fmt"
	"strings"
	"time"

	"google.golang.org/genproto/googleapis/rpc/errdetails"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"
)

// Error kinds, checked with errors.Is. Every error a [Client] returns for
// a connection is an [*Error] that wraps one of them, chosen by the
// broker's google.rpc.ErrorInfo reason (or, without one, the gRPC code).
var (
	// ErrNotFound: the broker has no such connection (it was deleted, or
	// never existed).
	ErrNotFound = errors.New("client: connection not found")
	// ErrNeedsReauth: the connection is halted in NEEDS_REAUTH; Acumatica
	// rejected its credentials (reasons CREDENTIALS_REJECTED,
	// CLIENT_REJECTED), or an authorization-code connection's chain ended
	// (AUTHORIZATION_REQUIRED). Nothing changes until an operator acts.
	ErrNeedsReauth = errors.New("client: connection needs re-authentication")
	// ErrRefreshTokenMissing: the connection is halted in
	// REFRESH_TOKEN_MISSING; the Connected Application lacks the
	// offline_access scope.
	ErrRefreshTokenMissing = errors.New("client: upstream issued no refresh token")
	// ErrUnavailable: no valid token can be had now (Acumatica failing, the
	// broker's store failing, the broker shutting down); retry after
	// [Error.RetryAfter].
	ErrUnavailable = errors.New("client: token unavailable")
	// ErrLoginLimit: the integration user's concurrent sign-ins are used up
	// (LOGIN_LIMIT_REACHED).
	ErrLoginLimit = errors.New("client: upstream login limit reached")
	// ErrRejectedTooOften: a fresh token was reported rejected again at once
	// (TOKEN_REJECTED_TOO_OFTEN): refreshing does not help; check the
	// instance URL and the integration user's role.
	ErrRejectedTooOften = errors.New("client: fresh token rejected again")
	// ErrTokenTooShort: the newest token cannot be valid for the margin
	// asked for (TOKEN_LIFETIME_TOO_SHORT).
	ErrTokenTooShort = errors.New("client: token lifetime shorter than the margin")
	// ErrPermissionDenied: this caller may not get tokens of the connection.
	ErrPermissionDenied = errors.New("client: permission denied")
	// ErrUnauthenticated: the broker does not know this caller's certificate.
	ErrUnauthenticated = errors.New("client: caller not authenticated")
	// ErrInvalidArgument: the request broke a rule (a malformed connection
	// name, a margin beyond 30 min).
	ErrInvalidArgument = errors.New("client: invalid argument")
	// ErrClosed: the [Client] was closed.
	ErrClosed = errors.New("client: closed")
)

// Error is a failure to get a token of one connection. Its message names
// the connection and the broker's reason; it never holds a token.
type Error struct {
	// Name is the connection's resource name.
	Name string
	// Reason is the broker's ErrorInfo reason, such as
	// "CREDENTIALS_REJECTED"; empty when the broker sent none.
	Reason string
	// Code is the gRPC status code.
	Code codes.Code
	// Message is the broker's message.
	Message string
	// RetryAfter is the broker's RetryInfo delay: the client makes no call
	// for the connection before it has passed.
	RetryAfter time.Duration

	kind error
	err  error // the gRPC status error, for status.FromError
}

func (e *Error) Error() string {
	var b strings.Builder
	fmt.Fprintf(&b, "%s %q", e.kind.Error(), e.Name)
	if e.Reason != "" {
		fmt.Fprintf(&b, " (%s)", e.Reason)
	}
	if e.Message != "" {
		b.WriteString(": " + e.Message)
	}
	if e.RetryAfter > 0 {
		fmt.Fprintf(&b, "; retry after %v", e.RetryAfter)
	}
	return b.String()
}

// Unwrap returns the kind and the gRPC status error.
func (e *Error) Unwrap() []error { return []error{e.kind, e.err} }

// GRPCStatus lets status.FromError and status.Code see the broker's status.
func (e *Error) GRPCStatus() *status.Status { s, _ := status.FromError(e.err); return s }

// kinds maps the broker's ErrorInfo reasons to kinds.
var kinds = map[string]error{
	"CONNECTION_NOT_FOUND":     ErrNotFound,
	"CREDENTIALS_REJECTED":     ErrNeedsReauth,
	"CLIENT_REJECTED":          ErrNeedsReauth,
	"AUTHORIZATION_REQUIRED":   ErrNeedsReauth,
	"REFRESH_TOKEN_MISSING":    ErrRefreshTokenMissing,
	"UPSTREAM_UNAVAILABLE":     ErrUnavailable,
	"UPSTREAM_RATE_LIMITED":    ErrUnavailable,
	"UPSTREAM_PROTOCOL_ERROR":  ErrUnavailable,
	"REFRESH_TOKEN_REVOKED":    ErrUnavailable,
	"RECOVERING_AFTER_CRASH":   ErrUnavailable,
	"STORAGE_FAILURE":          ErrUnavailable,
	"SHUTTING_DOWN":            ErrUnavailable,
	"LOGIN_LIMIT_REACHED":      ErrLoginLimit,
	"TOKEN_REJECTED_TOO_OFTEN": ErrRejectedTooOften,
	"TOKEN_LIFETIME_TOO_SHORT": ErrTokenTooShort,
	"PERMISSION_DENIED":        ErrPermissionDenied,
	"UNAUTHENTICATED":          ErrUnauthenticated,
	"INVALID_ARGUMENT":         ErrInvalidArgument,
}

// codeKinds are the kinds of statuses without a known reason.
var codeKinds = map[codes.Code]error{
	codes.NotFound:           ErrNotFound,
	codes.PermissionDenied:   ErrPermissionDenied,
	codes.Unauthenticated:    ErrUnauthenticated,
	codes.InvalidArgument:    ErrInvalidArgument,
	codes.Unavailable:        ErrUnavailable,
	codes.ResourceExhausted:  ErrUnavailable,
	codes.DeadlineExceeded:   ErrUnavailable,
	codes.FailedPrecondition: ErrNeedsReauth,
}

// fromRPC turns a failed call for connection name into an [*Error]; a
// caller's own context error is returned as it is.
func fromRPC(name string, err error) error {
	if err == nil {
		return nil
	}
	if errors.Is(err, context.Canceled) || errors.Is(err, context.DeadlineExceeded) {
		return err
	}
	st, _ := status.FromError(err)
	e := &Error{Name: name, Code: st.Code(), Message: st.Message(), err: err}
	for _, d := range st.Details() {
		switch d := d.(type) {
		case *errdetails.ErrorInfo:
			e.Reason = d.GetReason()
		case *errdetails.RetryInfo:
			e.RetryAfter = d.GetRetryDelay().AsDuration()
		}
	}
	e.kind = kinds[e.Reason]
	if e.kind == nil {
		e.kind = codeKinds[e.Code]
	}
	if e.kind == nil {
		e.kind = ErrUnavailable
	}
	return e
}

// terminal reports whether err means the connection cannot give tokens
// until someone changes something: reconnecting soon will not help.
func terminal(err error) bool {
	for _, k := range []error{ErrNotFound, ErrNeedsReauth, ErrRefreshTokenMissing, ErrPermissionDenied, ErrUnauthenticated, ErrInvalidArgument} {
		if errors.Is(err, k) {
			return true
		}
	}
	return false
}
