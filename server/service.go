package server

import (
	"context"
	"log/slog"
	"sync/atomic"

	"google.golang.org/protobuf/types/known/timestamppb"

	pb "tokenbroker/gen/tokenbroker/v1"

	"tokenbroker/broker"
)

// service implements tokenbroker.v1.TokenBroker. Requests reach it already
// validated by [validator].
type service struct {
	pb.UnimplementedTokenBrokerServer
	b     *broker.Broker
	log   *slog.Logger
	drain context.Context // done when the server stops: watch streams end

	lastWatch atomic.Pointer[pb.WatchAccessTokenResponse] // the message last sent on a watch stream (watch.go)
}

func (s *service) CreateConnection(ctx context.Context, r *pb.CreateConnectionRequest) (*pb.CreateConnectionResponse, error) {
	tenant, _ := broker.ParseParent(r.GetParent(), false)
	c := fromProto(r.GetConnection())
	c.Name = broker.ConnectionName(tenant, r.GetConnectionId())
	v, err := s.b.CreateConnection(ctx, c, r.GetValidateOnly())
	if err != nil {
		return nil, toStatus(s.log, err)
	}
	return &pb.CreateConnectionResponse{Connection: toProto(v)}, nil
}

func (s *service) GetConnection(ctx context.Context, r *pb.GetConnectionRequest) (*pb.GetConnectionResponse, error) {
	v, err := s.b.GetConnection(ctx, r.GetName())
	if err != nil {
		return nil, toStatus(s.log, err)
	}
	return &pb.GetConnectionResponse{Connection: toProto(v)}, nil
}

func (s *service) ListConnections(ctx context.Context, r *pb.ListConnectionsRequest) (*pb.ListConnectionsResponse, error) {
	tenant, _ := broker.ParseParent(r.GetParent(), true)
	after, _ := decodePageToken(r.GetPageToken(), r.GetParent())
	size := int(r.GetPageSize())
	if size == 0 {
		size = defaultPageSize
	}
	size = min(size, maxPageSize)
	views, next, err := s.b.ListConnections(ctx, broker.NamePrefix(tenant), after, size, listFilter(ctx))
	if err != nil {
		return nil, toStatus(s.log, err)
	}
	out := &pb.ListConnectionsResponse{NextPageToken: encodePageToken(r.GetParent(), next)}
	for _, v := range views {
		out.Connections = append(out.Connections, toProto(v))
	}
	return out, nil
}

func (s *service) UpdateConnection(ctx context.Context, r *pb.UpdateConnectionRequest) (*pb.UpdateConnectionResponse, error) {
	patch := fromProto(r.GetConnection())
	v, err := s.b.UpdateConnection(ctx, r.GetConnection().GetName(), patch, r.GetUpdateMask().GetPaths(), r.GetConnection().GetEtag(), r.GetValidateOnly())
	if err != nil {
		return nil, toStatus(s.log, err)
	}
	return &pb.UpdateConnectionResponse{Connection: toProto(v)}, nil
}

func (s *service) DeleteConnection(ctx context.Context, r *pb.DeleteConnectionRequest) (*pb.DeleteConnectionResponse, error) {
	if err := s.b.DeleteConnection(ctx, r.GetName(), r.GetEtag()); err != nil {
		return nil, toStatus(s.log, err)
	}
	return &pb.DeleteConnectionResponse{}, nil
}

var outcomes = map[broker.Outcome]pb.TestConnectionResponse_EntityResult_Outcome{
	broker.OutcomeOK:        pb.TestConnectionResponse_EntityResult_OUTCOME_OK,
	broker.OutcomeForbidden: pb.TestConnectionResponse_EntityResult_OUTCOME_FORBIDDEN,
	broker.OutcomeNotFound:  pb.TestConnectionResponse_EntityResult_OUTCOME_NOT_FOUND,
	broker.OutcomeError:     pb.TestConnectionResponse_EntityResult_OUTCOME_ERROR,
}

func (s *service) TestConnection(ctx context.Context, r *pb.TestConnectionRequest) (*pb.TestConnectionResponse, error) {
	res, err := s.b.TestConnection(ctx, r.GetName(), r.GetEntities(), r.GetEndpoint())
	if err != nil {
		return nil, toStatus(s.log, err)
	}
	out := &pb.TestConnectionResponse{AccessTokenExpireTime: timestamppb.New(res.ExpireTime)}
	for _, e := range res.Entities {
		out.Entities = append(out.Entities, &pb.TestConnectionResponse_EntityResult{
			Entity: e.Entity, Outcome: outcomes[e.Outcome], HttpStatus: int32(e.HTTPStatus), Message: e.Message,
		})
	}
	return out, nil
}

func (s *service) GetAccessToken(ctx context.Context, r *pb.GetAccessTokenRequest) (*pb.GetAccessTokenResponse, error) {
	minValid := broker.MinValidDefault // the broker knows the token lifetime
	if d := r.GetMinValidFor(); d != nil {
		minValid = d.AsDuration()
	}
	tok, err := s.b.GetAccessToken(ctx, r.GetName(), minValid, r.GetRejectedAccessToken())
	if err != nil {
		return nil, toStatus(s.log, err)
	}
	return &pb.GetAccessTokenResponse{
		AccessToken: tok.AccessToken,
		TokenType:   tok.TokenType,
		ExpireTime:  timestamppb.New(tok.ExpireTime),
		InstanceUrl: tok.InstanceURL,
		Scopes:      tok.Scopes, // the snapshot's slice is never modified

	}, nil
}
