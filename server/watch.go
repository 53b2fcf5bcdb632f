package server

import (
	"context"
	"strings"

	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"
	"google.golang.org/protobuf/types/known/timestamppb"

	pb "tokenbroker/gen/tokenbroker/v1"

	"tokenbroker/broker"
)

// WatchAccessToken sends the connection's current token, then each newer
// one as the broker commits it, until the connection is deleted or halts,
// the caller goes away, or the server stops. Each send is a hand-out: the
// audit interceptor records it and the authorization wrapper checks it.
//
// A consumer that reads slowly holds up only its own stream: the broker
// wakes every watcher without waiting for any, and each wakes to the newest
// token, so nothing queues beyond the one message gRPC is sending. A
// consumer that is gone is found by the server's keepalive pings.
func (s *service) WatchAccessToken(r *pb.WatchAccessTokenRequest, stream grpc.ServerStreamingServer[pb.WatchAccessTokenResponse]) error {
	// The request is GetAccessToken's without rejected_access_token, and is
	// validated by the same rules.
	if err := (validator{}).validate(&pb.GetAccessTokenRequest{Name: r.GetName(), MinValidFor: r.GetMinValidFor()}); err != nil {
		return err
	}
	minValid := defaultMinValidFor
	if d := r.GetMinValidFor(); d != nil {
		minValid = d.AsDuration()
	}
	w, err := s.b.WatchToken(r.GetName(), minValid)
	if err != nil {
		return toStatus(s.log, err)
	}
	ctx, cancel := context.WithCancel(stream.Context())
	defer cancel()
	defer context.AfterFunc(s.drain, cancel)()
	for {
		tok, err := w.Next(ctx)
		if err != nil {
			if s.drain.Err() != nil {
				err = broker.ErrClosed // the caller reconnects, to another replica
			}
			return toStatus(s.log, err)
		}
		if err := stream.Send(&pb.WatchAccessTokenResponse{
			AccessToken: tok.AccessToken,
			TokenType:   tok.TokenType,
			ExpireTime:  timestamppb.New(tok.ExpireTime),
			InstanceUrl: tok.InstanceURL,
			Scopes:      tok.Scopes,
		}); err != nil {
			return err
		}
	}
}

// validate is the validation interceptor's check for a request a stream
// handler received.
func (val validator) validate(req any) error {
	v, err := val.check(req)
	if err != nil {
		return err
	}
	if len(v) > 0 {
		return invalidArgument(v)
	}
	return nil
}

// isWatch reports whether a stream is WatchAccessToken.
func isWatch(info *grpc.StreamServerInfo) bool {
	return info.FullMethod == pb.TokenBroker_WatchAccessToken_FullMethodName
}

// consumerStream authorizes a WatchAccessToken stream as GetAccessToken is
// authorized: the consumer role on the connection it names, checked when
// the request arrives and again before every token sent, so that a policy
// reload that takes the grant away ends the stream.
type consumerStream struct {
	grpc.ServerStream
	a    *Authorizer
	id   string
	name string
}

func (s *consumerStream) RecvMsg(m any) error {
	if err := s.ServerStream.RecvMsg(m); err != nil {
		return err
	}
	if r, ok := m.(*pb.WatchAccessTokenRequest); ok {
		s.name = r.GetName()
	}
	return s.check()
}

func (s *consumerStream) SendMsg(m any) error {
	if err := s.check(); err != nil {
		return err
	}
	return s.ServerStream.SendMsg(m)
}

func (s *consumerStream) check() error {
	p := s.a.policy.Load()
	if p == nil || (p.Known(s.id) && p.CanConsume(s.id, s.name)) {
		return nil
	}
	return toStatus(nil, &authError{kind: errPermissionDenied, identity: s.id, name: s.name})
}

// stream audits TokenBroker streams: each token a WatchAccessToken stream
// sends is recorded like a GetAccessToken hand-out (buffered, fingerprint
// only), and the stream's end with its outcome (written out at once).
func (a *Auditor) stream(srv any, ss grpc.ServerStream, info *grpc.StreamServerInfo, handler grpc.StreamHandler) error {
	if !strings.HasPrefix(info.FullMethod, tokenBrokerMethods) {
		return handler(srv, ss)
	}
	as := &auditStream{ServerStream: ss, a: a, method: info.FullMethod}
	err := handler(srv, as)
	a.record(ss.Context(), info.FullMethod, as.target, status.Code(err), "", nil, nil, true)
	return err
}

type auditStream struct {
	grpc.ServerStream
	a      *Auditor
	method string
	target string
}

func (s *auditStream) RecvMsg(m any) error {
	err := s.ServerStream.RecvMsg(m)
	if r, ok := m.(*pb.WatchAccessTokenRequest); ok && err == nil {
		s.target = r.GetName()
	}
	return err
}

func (s *auditStream) SendMsg(m any) error {
	err := s.ServerStream.SendMsg(m)
	if r, ok := m.(*pb.WatchAccessTokenResponse); ok && err == nil {
		s.a.record(s.Context(), s.method, s.target, codes.OK, r.GetAccessToken(), r.GetExpireTime(), nil, false)
	}
	return err
}

// countWatches keeps the open-streams gauge.
func (m *Metrics) countWatches(srv any, ss grpc.ServerStream, info *grpc.StreamServerInfo, handler grpc.StreamHandler) error {
	if !isWatch(info) {
		return handler(srv, ss)
	}
	m.watches.Inc()
	defer m.watches.Dec()
	return handler(srv, ss)
}

// stream charges one call to the caller's bucket for opening a stream.
func (l *rateLimiter) stream(srv any, ss grpc.ServerStream, _ *grpc.StreamServerInfo, handler grpc.StreamHandler) error {
	now := l.clock()
	if !l.bucket(l.who(ss.Context()), now).AllowN(now, 1) {
		return toStatus(nil, errRateLimited)
	}
	return handler(srv, ss)
}
