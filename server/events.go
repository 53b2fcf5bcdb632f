package server

import (
	"context"

	"google.golang.org/grpc"
	"google.golang.org/protobuf/types/known/timestamppb"

	pb "tokenbroker/gen/tokenbroker/v1"

	"tokenbroker/broker"
)

var eventTypes = map[broker.EventType]pb.WatchConnectionsResponse_Type{
	broker.EventExisting:     pb.WatchConnectionsResponse_TYPE_EXISTING,
	broker.EventSynced:       pb.WatchConnectionsResponse_TYPE_SYNCED,
	broker.EventCreated:      pb.WatchConnectionsResponse_TYPE_CREATED,
	broker.EventUpdated:      pb.WatchConnectionsResponse_TYPE_UPDATED,
	broker.EventDeleted:      pb.WatchConnectionsResponse_TYPE_DELETED,
	broker.EventStateChanged: pb.WatchConnectionsResponse_TYPE_STATE_CHANGED,
	broker.EventWarning:      pb.WatchConnectionsResponse_TYPE_WARNING,
}

// WatchConnections streams connection events to an operator: the stream
// interceptor admitted only operators, and the tenants they operate
// bound what is sent.
func (s *service) WatchConnections(r *pb.WatchConnectionsRequest, stream grpc.ServerStreamingServer[pb.WatchConnectionsResponse]) error {
	req, scope, err := watchRequest(stream.Context(), r)
	if err != nil {
		return err
	}
	err = s.b.WatchConnections(stream.Context(), req, func(ev *broker.Event) error {
		if scope != nil {
			if err := scope.entitled(); err != nil {
				return err
			}
			if ev.Name != "" && !scope.shows(ev.Name) {
				return nil // a tenant the policy no longer lets the caller operate
			}
		}
		return stream.Send(eventToProto(ev))
	})
	return toStatus(s.log, err)
}

// watchRequest checks r against the caller's tenants and turns it into the
// broker's selection. Under a policy it also returns the stream's scope,
// which rechecks the current policy at every event.
func watchRequest(ctx context.Context, r *pb.WatchConnectionsRequest) (broker.WatchRequest, *watchScope, error) {
	var v []broker.FieldViolation
	tenant, err := broker.ParseParent(r.GetParent(), true)
	if err != nil {
		v = append(v, broker.FieldViolation{Field: "parent", Description: err.Error()})
	}
	if r.GetAfterSequence() < 0 {
		v = append(v, broker.FieldViolation{Field: "after_sequence", Description: "must not be negative"})
	}
	switch {
	case len(r.GetFeedId()) > 64:
		v = append(v, broker.FieldViolation{Field: "feed_id", Description: "is longer than 64 characters"})
	case r.GetFeedId() == "" && r.GetAfterSequence() > 0:
		// A sequence is only meaningful within its feed (one per replica
		// and process): without it, another replica's events would be
		// replayed as if they were the ones missed.
		v = append(v, broker.FieldViolation{Field: "feed_id", Description: "is required with after_sequence: copy feed_id from the message the sequence came from"})
	}
	if len(v) > 0 {
		return broker.WatchRequest{}, nil, invalidArgument(v)
	}
	req := broker.WatchRequest{Prefix: broker.NamePrefix(tenant), AfterSeq: r.GetAfterSequence(), FeedID: r.GetFeedId()}
	op, scoped := ctx.Value(operatorKey{}).(operatorScope)
	if !scoped {
		return req, nil, nil // dev mode: every caller operates every tenant
	}
	scope := &watchScope{op: op, tenant: tenant, parent: r.GetParent()}
	if err := scope.entitled(); err != nil {
		return req, nil, err
	}
	// An event reaches the stream's send, which ends it, once the caller
	// lost what it asked for; until then, only tenants it operates.
	req.Allow = func(name string) bool { return scope.shows(name) || scope.entitled() != nil }
	return req, scope, nil
}

// watchScope is what an operator's WatchConnections stream may see, read
// from the current policy at each event so that a reload takes effect on
// open streams, as it does on WatchAccessToken streams.
type watchScope struct {
	op     operatorScope
	tenant string // broker.AllTenants: every tenant the caller operates
	parent string
}

// entitled is nil while the caller still operates what the stream asked
// for (one tenant, or any for every tenant), else PERMISSION_DENIED.
func (w *watchScope) entitled() error {
	ok := w.op.manages(w.tenant)
	if w.tenant == broker.AllTenants {
		ok = w.op.operator()
	}
	if ok {
		return nil
	}
	return toStatus(nil, &authError{kind: errPermissionDenied, identity: w.op.id.Value, name: w.parent})
}

// shows reports whether an event about connection name may be sent.
func (w *watchScope) shows(name string) bool {
	t, _, _ := broker.ParseConnectionName(name)
	return w.op.manages(t)
}

func eventToProto(ev *broker.Event) *pb.WatchConnectionsResponse {
	out := &pb.WatchConnectionsResponse{
		Type:        eventTypes[ev.Type],
		Sequence:    ev.Seq,
		FeedId:      ev.FeedID,
		EventTime:   timestamppb.New(ev.Time),
		WarningCode: ev.WarningCode,
		Warning:     ev.Warning,
		Resync:      ev.Resync,
	}
	if ev.View != nil {
		out.Connection = toProto(ev.View)
	}
	if ev.Type == broker.EventStateChanged {
		out.PreviousState = states[ev.PrevState]
	}
	return out
}

// operatorKey carries, on an operator's stream, its [operatorScope].
type operatorKey struct{}

// operatorScope is the caller of an operator's stream: what it operates
// is read from the authorizer's current policy at each question, so a
// reload applies to streams already open.
type operatorScope struct {
	a  *Authorizer
	id Caller
}

// manages reports whether the caller operates tenant under the current
// policy (every caller does in dev mode).
func (s operatorScope) manages(tenant string) bool {
	p := s.a.policy.Load()
	return p == nil || p.Known(s.id.Key()) && p.CanManage(s.id.Key(), tenant)
}

// operator reports whether the caller operates any tenant under the
// current policy.
func (s operatorScope) operator() bool {
	p := s.a.policy.Load()
	return p == nil || p.Known(s.id.Key()) && p.IsOperator(s.id.Key())
}

// operatorStream is ss with the caller's operatorScope in its context.
type operatorStream struct {
	grpc.ServerStream
	ctx context.Context
}

func (s *operatorStream) Context() context.Context { return s.ctx }

func withOperator(ss grpc.ServerStream, scope operatorScope) grpc.ServerStream {
	return &operatorStream{ServerStream: ss, ctx: context.WithValue(ss.Context(), operatorKey{}, scope)}
}
