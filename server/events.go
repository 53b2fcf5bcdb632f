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
	req, err := watchRequest(stream.Context(), r)
	if err != nil {
		return err
	}
	err = s.b.WatchConnections(stream.Context(), req, func(ev *broker.Event) error {
		return stream.Send(eventToProto(ev))
	})
	return toStatus(s.log, err)
}

// watchRequest checks r against the caller's tenants and turns it into the
// broker's selection.
func watchRequest(ctx context.Context, r *pb.WatchConnectionsRequest) (broker.WatchRequest, error) {
	var v []broker.FieldViolation
	tenant, err := broker.ParseParent(r.GetParent(), true)
	if err != nil {
		v = append(v, broker.FieldViolation{Field: "parent", Description: err.Error()})
	}
	if r.GetAfterSequence() < 0 {
		v = append(v, broker.FieldViolation{Field: "after_sequence", Description: "must not be negative"})
	}
	if len(r.GetFeedId()) > 64 {
		v = append(v, broker.FieldViolation{Field: "feed_id", Description: "is longer than 64 characters"})
	}
	if len(v) > 0 {
		return broker.WatchRequest{}, invalidArgument(v)
	}
	req := broker.WatchRequest{Prefix: broker.NamePrefix(tenant), AfterSeq: r.GetAfterSequence(), FeedID: r.GetFeedId()}
	manage, scoped := ctx.Value(operatorKey{}).(func(tenant string) bool)
	if !scoped {
		return req, nil // dev mode: every caller operates every tenant
	}
	if tenant != broker.AllTenants && !manage(tenant) {
		return req, toStatus(nil, &authError{kind: errPermissionDenied, name: r.GetParent()})
	}
	req.Allow = func(name string) bool {
		t, _, _ := broker.ParseConnectionName(name)
		return manage(t)
	}
	return req, nil
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

// operatorKey carries, on an operator's stream, which tenants it operates.
type operatorKey struct{}

// operatorStream is ss with the tenants the caller operates in its
// context.
type operatorStream struct {
	grpc.ServerStream
	ctx context.Context
}

func (s *operatorStream) Context() context.Context { return s.ctx }

func withOperator(ss grpc.ServerStream, manage func(tenant string) bool) grpc.ServerStream {
	return &operatorStream{ServerStream: ss, ctx: context.WithValue(ss.Context(), operatorKey{}, manage)}
}
