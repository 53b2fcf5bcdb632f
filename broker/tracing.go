package broker

import (
	"context"
	"errors"
	"net/http"

	"go.opentelemetry.io/otel/attribute"
	"go.opentelemetry.io/otel/codes"
	"go.opentelemetry.io/otel/trace"
)

// Span attributes of upstream requests. They name the connection, the
// grant, the outcome and the HTTP status; never a token, a secret, a URL
// query or a body.
const (
	attrConnection = attribute.Key("tokenbroker.connection")
	attrRequest    = attribute.Key("tokenbroker.upstream.request") // token, discovery, revocation, logout, probe
	attrGrant      = attribute.Key("tokenbroker.grant")
	attrOutcome    = attribute.Key("tokenbroker.outcome")
	attrEntity     = attribute.Key("tokenbroker.entity")
	attrHTTPStatus = attribute.Key("http.response.status_code")
	attrHTTPMethod = attribute.Key("http.request.method")
)

// tracerName names the broker's spans' instrumentation scope.
const tracerName = "tokenbroker/broker"

// connNameKey carries the connection an upstream request is for, so that
// requests made deep in the upstream client (discovery) name it too.
type connNameKey struct{}

func withConnName(ctx context.Context, name string) context.Context {
	return context.WithValue(ctx, connNameKey{}, name)
}

func connNameOf(ctx context.Context) string {
	s, _ := ctx.Value(connNameKey{}).(string)
	return s
}

// startUpstream starts the client span of one upstream request of kind
// (token, discovery, revocation, logout, probe) for the connection ctx
// names.
func startUpstream(ctx context.Context, tr trace.Tracer, kind, method string, attrs ...attribute.KeyValue) (context.Context, trace.Span) {
	attrs = append(attrs, attrRequest.String(kind), attrHTTPMethod.String(method))
	if name := connNameOf(ctx); name != "" {
		attrs = append(attrs, attrConnection.String(name))
	}
	return tr.Start(ctx, "upstream "+kind, trace.WithSpanKind(trace.SpanKindClient), trace.WithAttributes(attrs...))
}

// endUpstream ends span with the request's outcome ("ok" or a failure
// class) and HTTP status (0: no answer).
func endUpstream(span trace.Span, outcome string, status int) {
	span.SetAttributes(attrOutcome.String(outcome))
	if status != 0 {
		span.SetAttributes(attrHTTPStatus.Int(status))
	}
	if outcome != "ok" {
		span.SetStatus(codes.Error, outcome)
	}
	span.End()
}

// endToken ends the span of a token request: "ok", or the failure class
// and the status it was answered with.
func endToken(span trace.Span, err error) {
	var ue *upstreamError
	switch {
	case err == nil:
		endUpstream(span, "ok", http.StatusOK)
	case errors.As(err, &ue):
		endUpstream(span, ue.class.String(), ue.status)
	default:
		endUpstream(span, "error", 0)
	}
}

// endHTTP ends the span of a request whose answer is judged by its status
// alone: "ok" for 2xx, else "http_error", or "transport_error" without an
// answer.
func endHTTP(span trace.Span, resp *http.Response, err error) {
	switch {
	case err != nil:
		endUpstream(span, "transport_error", 0)
	case resp.StatusCode >= 200 && resp.StatusCode < 300:
		endUpstream(span, "ok", resp.StatusCode)
	default:
		endUpstream(span, "http_error", resp.StatusCode)
	}
}
