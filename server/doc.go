// Package server is tokenbroker's gRPC edge: it implements
// tokenbroker.v1.TokenBroker over a [broker.Broker], validates every request
// before any handler work, turns broker errors into gRPC statuses with
// google.rpc error details ([toStatus] is the only place statuses are
// built), and assembles the interceptor chain (logging outermost, recovery
// innermost), health and reflection.
//
// It must never put a secret or token in a log line, an error message or a
// read response, and never let a panic reach a caller.
package server
