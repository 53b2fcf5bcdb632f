package server

import (
	"context"
	"sync"
	"time"

	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"
	"google.golang.org/protobuf/types/known/timestamppb"

	adminv1 "tokenbroker/gen/tokenbroker/admin/v1"
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
	minValid := broker.MinValidDefault // the broker knows the token lifetime
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
		if err := stream.Send(s.watchMessage(tok)); err != nil {
			return err
		}
	}
}

// watchMessage returns the message that carries tok. Every stream of a
// rotation sends the same token: the message is built once and shared (gRPC
// only reads it).
func (s *service) watchMessage(tok broker.Token) *pb.WatchAccessTokenResponse {
	if m := s.lastWatch.Load(); m != nil && m.GetAccessToken() == tok.AccessToken && m.GetInstanceUrl() == tok.InstanceURL {
		return m
	}
	m := &pb.WatchAccessTokenResponse{
		AccessToken: tok.AccessToken,
		TokenType:   tok.TokenType,
		ExpireTime:  timestamppb.New(tok.ExpireTime),
		InstanceUrl: tok.InstanceURL,
		Scopes:      tok.Scopes,
	}
	s.lastWatch.Store(m)
	return m
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
	id   Caller
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
	if p == nil || (p.Known(s.id.Key()) && p.CanConsume(s.id.Key(), s.name)) {
		return nil
	}
	return toStatus(nil, &authError{kind: errPermissionDenied, identity: s.id.Value, name: s.name})
}

// stream audits TokenBroker streams: each token a WatchAccessToken stream
// sends is recorded like a GetAccessToken hand-out (buffered, fingerprint
// only), and every stream's end with its outcome (written out at once).
func (a *Auditor) stream(srv any, ss grpc.ServerStream, info *grpc.StreamServerInfo, handler grpc.StreamHandler) error {
	if !audited(info.FullMethod) {
		return handler(srv, ss)
	}
	as := &auditStream{ServerStream: ss, a: a, method: info.FullMethod, caller: a.who(ss.Context()),
		shard: int(a.nextShard.Add(1) % pushShards), records: noCount}
	if info.FullMethod == adminv1.AdminBroker_Backup_FullMethodName {
		as.records = 0
	}
	err := handler(srv, as)
	a.record(as.caller, info.FullMethod, as.target, status.Code(err), "", nil, nil, as.records, true)
	return err
}

type auditStream struct {
	grpc.ServerStream
	a      *Auditor
	method string
	caller string // the stream's caller identity, found once
	target string
	prefix []byte // what every push's audit line has after its time
	shard  int    // the Auditor's push buffer this stream writes to
	// records counts the records a Backup stream sent (noCount for other
	// streams); the records themselves are never audited.
	records int64
}

func (s *auditStream) RecvMsg(m any) error {
	err := s.ServerStream.RecvMsg(m)
	if err == nil {
		s.target = auditTarget(m)
	}
	return err
}

func (s *auditStream) SendMsg(m any) error {
	err := s.ServerStream.SendMsg(m)
	if err != nil {
		return err
	}
	switch r := m.(type) {
	case *pb.WatchAccessTokenResponse:
		s.a.recordPush(s.shard, s.pushPrefix(), r)
	case *adminv1.BackupResponse:
		s.records += int64(len(r.GetRecords()))
	}
	return nil
}

// pushPrefix is the part of a push's audit line, after its time, that every
// push of the stream shares: one rotation sent to thousands of streams
// writes thousands of lines, each built from this, the time, and the
// token's part (see [Auditor.recordPush]). The line is the one record
// writes for a GetAccessToken hand-out.
func (s *auditStream) pushPrefix() []byte {
	if s.prefix == nil {
		b := append([]byte(nil), `","msg":"audit","caller":`...)
		b = appendJSONString(b, s.caller)
		b = append(b, `,"method":`...)
		b = appendJSONString(b, s.method)
		b = append(b, `,"connection":`...)
		b = appendJSONString(b, s.target)
		b = append(b, `,"outcome":`...)
		b = appendJSONString(b, codes.OK.String())
		s.prefix = append(b, `,"token_fingerprint":"`...)
	}
	return s.prefix
}

// pushShards is how many buffers push lines are spread over. One rotation
// wakes thousands of streams at once; with a single buffer they would queue
// on its mutex, and the queue, not the line, was most of a push's cost.
const pushShards = 16

// pushShard buffers the audit lines of some watch streams' pushes until
// the next flush (every second, and before any admin call's line).
type pushShard struct {
	mu  sync.Mutex
	buf []byte
}

// recordPush buffers the audit line of a token sent on a watch stream.
func (a *Auditor) recordPush(shard int, prefix []byte, r *pb.WatchAccessTokenResponse) {
	sh := &a.pushes[shard]
	sh.mu.Lock()
	sh.buf = append(sh.buf, `{"time":"`...)
	sh.buf = time.Now().UTC().AppendFormat(sh.buf, time.RFC3339Nano)
	sh.buf = append(sh.buf, prefix...)
	sh.buf = append(sh.buf, a.pushSuffix(r)...)
	full := len(sh.buf) >= 64<<10
	sh.mu.Unlock()
	if full {
		a.mu.Lock()
		a.drainPushesLocked()
		a.mu.Unlock()
	}
}

// drainPushesLocked moves the buffered push lines into the audit writer.
// a.mu must be held.
func (a *Auditor) drainPushesLocked() {
	for i := range a.pushes {
		sh := &a.pushes[i]
		sh.mu.Lock()
		if len(sh.buf) > 0 {
			a.w.Write(sh.buf)
			sh.buf = sh.buf[:0]
		}
		sh.mu.Unlock()
	}
}

// pushSuffix is the token's part of a push's audit line: its fingerprint
// and expiry, made once per token.
func (a *Auditor) pushSuffix(r *pb.WatchAccessTokenResponse) string {
	if p := a.lastPush.Load(); p != nil && p.token == r.GetAccessToken() {
		return p.fingerprint
	}
	b := appendFingerprint(nil, r.GetAccessToken())
	b = append(b, `","token_expire_time":"`...)
	b = r.GetExpireTime().AsTime().UTC().AppendFormat(b, time.RFC3339)
	b = append(b, "\"}\n"...)
	a.lastPush.Store(&fingerprinted{token: r.GetAccessToken(), fingerprint: string(b)})
	return string(b)
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
