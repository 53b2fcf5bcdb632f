package server

import (
	"context"

	"google.golang.org/protobuf/types/known/fieldmaskpb"
	"google.golang.org/protobuf/types/known/timestamppb"

	pb "tokenbroker/gen/tokenbroker/v1"

	"tokenbroker/broker"
)

// The Authorization Code flow's RPCs and ImportRefreshToken: operator
// calls on one connection, new (parent and connection_id) or existing
// (name).

// targetRequest is what StartAuthorization and ImportRefreshToken share.
type targetRequest interface {
	GetParent() string
	GetConnectionId() string
	GetName() string
	GetConnection() *pb.Connection
	GetUpdateMask() *fieldmaskpb.FieldMask
}

// targetName is the connection a target request names: name, or parent
// and connection_id.
func targetName(r targetRequest) string {
	if r.GetName() != "" {
		return r.GetName()
	}
	tenant, _ := broker.ParseParent(r.GetParent(), false)
	return broker.ConnectionName(tenant, r.GetConnectionId())
}

// targetTenant is the tenant a target request is for, "" when it names
// none validly.
func targetTenant(r targetRequest) string {
	if r.GetName() != "" {
		t, _, _ := broker.ParseConnectionName(r.GetName())
		return t
	}
	t, _ := broker.ParseParent(r.GetParent(), false)
	return t
}

// toTarget is the broker's target of a checked request.
func toTarget(r targetRequest) broker.Target {
	c := fromProto(r.GetConnection())
	c.Name = targetName(r)
	if r.GetName() == "" {
		return broker.Target{Conn: c}
	}
	return broker.Target{Conn: c, Existing: true, Fields: r.GetUpdateMask().GetPaths(), ETag: r.GetConnection().GetEtag()}
}

// checkTarget checks the naming fields of a target request: exactly one of
// name, or parent with connection_id; a mask only with name.
func checkTarget(r targetRequest, v *violations) {
	if r.GetName() != "" {
		v.name("name", r.GetName())
		if r.GetParent() != "" || r.GetConnectionId() != "" {
			v.add("name", "set either name (an existing connection) or parent and connection_id (a new one), not both")
		}
		for _, p := range r.GetUpdateMask().GetPaths() {
			if _, ok := broker.Updatable[p]; !ok {
				v.add("update_mask", "field %q cannot be changed", p)
			}
		}
		return
	}
	checkNewConnection(r.GetParent(), r.GetConnectionId(), r.GetConnection() != nil, v)
	if len(r.GetUpdateMask().GetPaths()) > 0 {
		v.add("update_mask", "is for an existing connection (name) only")
	}
}

// checkAuthCodeRequest validates the requests of this file; ok is false
// for any other request.
func checkAuthCodeRequest(req any, v *violations) (ok bool) {
	switch r := req.(type) {
	case *pb.StartAuthorizationRequest:
		checkTarget(r, v)
	case *pb.ImportRefreshTokenRequest:
		checkTarget(r, v)
		if r.GetRefreshToken() == "" {
			v.add("refresh_token", "is required")
		}
	case *pb.CompleteAuthorizationRequest:
		v.name("name", r.GetName())
		if r.GetState() == "" {
			v.add("state", "is required: copy it from the redirect's query")
		}
		if r.GetCode() == "" {
			v.add("code", "is required: copy it from the redirect's query")
		}
	default:
		return false
	}
	return true
}

// authCodeResource is the resource name and tenant of a request of this
// file, for authorization; ok is false for any other request.
func authCodeResource(req any) (name, tenant string, ok bool) {
	switch r := req.(type) {
	case *pb.StartAuthorizationRequest:
		return targetName(r), targetTenant(r), true
	case *pb.ImportRefreshTokenRequest:
		return targetName(r), targetTenant(r), true
	case *pb.CompleteAuthorizationRequest:
		t, _, _ := broker.ParseConnectionName(r.GetName())
		return r.GetName(), t, true
	}
	return "", "", false
}

func (s *service) StartAuthorization(ctx context.Context, r *pb.StartAuthorizationRequest) (*pb.StartAuthorizationResponse, error) {
	a, err := s.b.StartAuthorization(ctx, toTarget(r), r.GetValidateOnly())
	if err != nil {
		return nil, toStatus(s.log, err)
	}
	out := &pb.StartAuthorizationResponse{AuthorizationUrl: a.URL, Connection: toProto(a.View)}
	if !a.ExpireTime.IsZero() {
		out.ExpireTime = timestamppb.New(a.ExpireTime)
	}
	return out, nil
}

func (s *service) CompleteAuthorization(ctx context.Context, r *pb.CompleteAuthorizationRequest) (*pb.CompleteAuthorizationResponse, error) {
	v, err := s.b.CompleteAuthorization(ctx, r.GetName(), r.GetState(), r.GetCode())
	if err != nil {
		return nil, toStatus(s.log, err)
	}
	return &pb.CompleteAuthorizationResponse{Connection: toProto(v)}, nil
}

func (s *service) ImportRefreshToken(ctx context.Context, r *pb.ImportRefreshTokenRequest) (*pb.ImportRefreshTokenResponse, error) {
	v, err := s.b.ImportRefreshToken(ctx, toTarget(r), r.GetRefreshToken(), r.GetValidateOnly())
	if err != nil {
		return nil, toStatus(s.log, err)
	}
	return &pb.ImportRefreshTokenResponse{Connection: toProto(v)}, nil
}
