package server

import (
	"slices"
	"time"

	"google.golang.org/protobuf/types/known/durationpb"
	"google.golang.org/protobuf/types/known/timestamppb"

	pb "tokenbroker/gen/tokenbroker/v1"

	"tokenbroker/broker"
)

func ts(t time.Time) *timestamppb.Timestamp {
	if t.IsZero() {
		return nil
	}
	return timestamppb.New(t)
}

func dur(d time.Duration) *durationpb.Duration {
	if d == 0 {
		return nil
	}
	return durationpb.New(d)
}

var states = map[broker.State]pb.Connection_State{
	broker.StateActive:              pb.Connection_STATE_ACTIVE,
	broker.StateDegraded:            pb.Connection_STATE_DEGRADED,
	broker.StateNeedsReauth:         pb.Connection_STATE_NEEDS_REAUTH,
	broker.StateRefreshTokenMissing: pb.Connection_STATE_REFRESH_TOKEN_MISSING,
}

// toProto renders a broker view. Secrets are never set: the view has them
// cleared and only says whether they are stored.
func toProto(v *broker.View) *pb.Connection {
	c := v.Conn
	out := &pb.Connection{
		Name:                         c.Name,
		DisplayName:                  c.DisplayName,
		InstanceUrl:                  c.InstanceURL,
		ClientId:                     c.ClientID,
		ClientSecretSet:              v.ClientSecretSet,
		ClientSecretExpireTime:       ts(c.ClientSecretExpireTime),
		Username:                     c.Username,
		PasswordSet:                  v.PasswordSet,
		Scopes:                       slices.Clone(c.Scopes),
		RefreshTokenSlidingLifetime:  dur(c.SlidingLifetime),
		RefreshTokenAbsoluteLifetime: dur(c.AbsoluteLifetime),
		State:                        states[v.State],
		CreateTime:                   ts(c.CreateTime),
		UpdateTime:                   ts(c.UpdateTime),
		Etag:                         v.ETag,
		Flow:                         flowToProto(c.Flow),
		RedirectUri:                  c.RedirectURI,
	}
	st := v.Status
	out.Status = &pb.ConnectionStatus{
		LastRefreshTime:            ts(st.LastRefreshTime),
		AccessTokenExpireTime:      ts(st.AccessTokenExpireTime),
		HasRefreshToken:            st.HasRefreshToken,
		RefreshTokenIdleExpireTime: ts(st.RefreshTokenIdleExpireTime),
		RefreshTokenChainStartTime: ts(st.ChainStartTime),
		StateReason:                st.StateReason,
		Warnings:                   slices.Clone(st.Warnings),
	}
	if st.LastErrorCode != "" {
		out.Status.LastError = &pb.ConnectionError{Code: st.LastErrorCode, Message: st.LastErrorMessage, Time: ts(st.LastErrorTime)}
	}
	return out
}

// fromProto takes the input fields of an API connection.
func fromProto(c *pb.Connection) *broker.Connection {
	out := &broker.Connection{
		Name:         c.GetName(),
		DisplayName:  c.GetDisplayName(),
		InstanceURL:  c.GetInstanceUrl(),
		ClientID:     c.GetClientId(),
		ClientSecret: c.GetClientSecret(),
		Username:     c.GetUsername(),
		Password:     c.GetPassword(),
		Scopes:       slices.Clone(c.GetScopes()),
		Flow:         flowFromProto(c.GetFlow()),
		RedirectURI:  c.GetRedirectUri(),
	}
	if t := c.GetClientSecretExpireTime(); t != nil {
		out.ClientSecretExpireTime = t.AsTime()
	}
	if d := c.GetRefreshTokenSlidingLifetime(); d != nil {
		out.SlidingLifetime = d.AsDuration()
	}
	if d := c.GetRefreshTokenAbsoluteLifetime(); d != nil {
		out.AbsoluteLifetime = d.AsDuration()
	}
	return out
}

// flowToProto renders a stored flow; "" is a record written before flows
// existed: the password flow.
func flowToProto(f string) pb.Connection_Flow {
	if f == broker.FlowAuthorizationCode {
		return pb.Connection_FLOW_AUTHORIZATION_CODE
	}
	return pb.Connection_FLOW_PASSWORD
}

// flowFromProto takes an input flow; an unknown number becomes a flow the
// broker's input rules refuse.
func flowFromProto(f pb.Connection_Flow) string {
	switch f {
	case pb.Connection_FLOW_UNSPECIFIED:
		return ""
	case pb.Connection_FLOW_PASSWORD:
		return broker.FlowPassword
	case pb.Connection_FLOW_AUTHORIZATION_CODE:
		return broker.FlowAuthorizationCode
	}
	return "unknown"
}
