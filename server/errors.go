package server

import (
	"context"
	"errors"
	"log/slog"
	"time"

	"google.golang.org/genproto/googleapis/rpc/errdetails"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"
	"google.golang.org/protobuf/protoadapt"
	"google.golang.org/protobuf/types/known/durationpb"

	"tokenbroker/broker"
)

// errorDomain is the ErrorInfo domain of every status this service returns.
const errorDomain = "tokenbroker.v1"

// toStatus turns an error into a gRPC status with a google.rpc.ErrorInfo
// (and BadRequest or RetryInfo where they apply). It is the only function
// that builds statuses. Messages come from broker errors, which never carry
// secrets; anything unexpected becomes a generic INTERNAL.
func toStatus(log *slog.Logger, err error) error {
	if err == nil {
		return nil
	}
	if _, ok := status.FromError(err); ok {
		return err
	}
	var ae *authError
	if errors.As(err, &ae) {
		return authStatus(ae)
	}
	var be *broker.Error
	if errors.As(err, &be) {
		return brokerStatus(be)
	}
	return plainStatus(log, err)
}

// authStatus is the status of a caller the authorizer turned away.
func authStatus(ae *authError) error {
	if errors.Is(ae, errUnauthenticated) {
		return withDetails(codes.Unauthenticated, "caller not authenticated: present a client certificate the policy names", "UNAUTHENTICATED", "", 0, nil)
	}
	msg := "caller " + ae.identity + " may not do this"
	if ae.name != "" {
		msg += " on " + ae.name
	}
	return withDetails(codes.PermissionDenied, msg, "PERMISSION_DENIED", ae.name, 0, nil)
}

// plainStatus is the status of an error that is not the broker's: the
// caller's own deadline or cancellation, the rate limit, shutdown, or
// something unexpected, which is logged and answered as a generic INTERNAL.
func plainStatus(log *slog.Logger, err error) error {
	switch {
	case errors.Is(err, context.DeadlineExceeded):
		return withDetails(codes.DeadlineExceeded, "deadline exceeded while waiting for the token", "DEADLINE_EXCEEDED", "", 0, nil)
	case errors.Is(err, context.Canceled):
		return withDetails(codes.Canceled, "canceled", "CANCELED", "", 0, nil)
	case errors.Is(err, errRateLimited):
		return withDetails(codes.ResourceExhausted, "caller rate limit exceeded; slow down", "RATE_LIMITED", "", time.Second, nil)
	case errors.Is(err, broker.ErrClosed):
		return withDetails(codes.Unavailable, "server is shutting down", "SHUTTING_DOWN", "", 0, nil)
	}
	if log != nil {
		log.Error("unexpected error", "error", err.Error())
	}
	return withDetails(codes.Internal, "internal error", "INTERNAL", "", 0, nil)
}

// brokerStatus carries a broker error's kind, reason, connection and
// violations; an UNAVAILABLE answer always says when to retry.
func brokerStatus(be *broker.Error) error {
	code := brokerCode(be)
	msg := be.Error()
	if code == codes.NotFound {
		msg = "connection " + be.Name + " not found"
	}
	retry := be.RetryAfter
	if code == codes.Unavailable && retry <= 0 {
		retry = time.Second
	}
	return withDetails(code, msg, be.Reason, be.Name, retry, be.Violations)
}

// brokerCode maps a broker error's kind to its gRPC code.
func brokerCode(be *broker.Error) codes.Code {
	switch {
	case errors.Is(be, broker.ErrInvalidArgument):
		return codes.InvalidArgument
	case errors.Is(be, broker.ErrNotFound):
		return codes.NotFound
	case errors.Is(be, broker.ErrAlreadyExists):
		return codes.AlreadyExists
	case errors.Is(be, broker.ErrConflict):
		return codes.Aborted
	case errors.Is(be, broker.ErrCredentialsRejected), errors.Is(be, broker.ErrRefreshTokenMissing), errors.Is(be, broker.ErrTokenTooShort), errors.Is(be, broker.ErrAuthorization), errors.Is(be, broker.ErrAddressRefused):
		return codes.FailedPrecondition
	case errors.Is(be, broker.ErrUpstreamUnavailable), errors.Is(be, broker.ErrLoginLimit), errors.Is(be, broker.ErrStorage), errors.Is(be, broker.ErrClosed):
		return codes.Unavailable
	}
	return codes.Internal
}

func withDetails(code codes.Code, msg, reason, name string, retry time.Duration, violations []broker.FieldViolation) error {
	st := status.New(code, msg)
	info := &errdetails.ErrorInfo{Reason: reason, Domain: errorDomain}
	if name != "" {
		info.Metadata = map[string]string{"connection": name}
	}
	details := []protoadapt.MessageV1{info}
	if len(violations) > 0 {
		br := &errdetails.BadRequest{}
		for _, v := range violations {
			br.FieldViolations = append(br.FieldViolations, &errdetails.BadRequest_FieldViolation{Field: v.Field, Description: v.Description})
		}
		details = append(details, br)
	}
	if retry > 0 {
		details = append(details, &errdetails.RetryInfo{RetryDelay: durationpb.New(retry)})
	}
	if s, err := st.WithDetails(details...); err == nil {
		st = s
	}
	return st.Err()
}

// invalidArgument is the status for request validation failures.
func invalidArgument(violations []broker.FieldViolation) error {
	msg := "invalid request"
	if len(violations) > 0 {
		msg = "invalid " + violations[0].Field + ": " + violations[0].Description
		if len(violations) > 1 {
			msg += " (and more; see BadRequest details)"
		}
	}
	return withDetails(codes.InvalidArgument, msg, broker.ReasonInvalidArgument, "", 0, violations)
}
