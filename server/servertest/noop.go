package servertest

import (
	"context"

	"google.golang.org/grpc"
	"google.golang.org/protobuf/types/known/emptypb"

	pb "tokenbroker/gen/tokenbroker/v1"
)

// NoopMethod is the full name of the baseline RPC that [RegisterNoop] adds.
const NoopMethod = "/tokenbroker.bench.Noop/Ping"

// RegisterNoop adds a unary RPC that does nothing to s, so that benchmarks
// can compare an RPC against the same server stack (listener, credentials,
// every interceptor) with no work behind it. Register before s serves.
func RegisterNoop(s *grpc.Server) {
	s.RegisterService(&grpc.ServiceDesc{
		ServiceName: "tokenbroker.bench.Noop",
		HandlerType: (*any)(nil),
		Methods: []grpc.MethodDesc{{
			MethodName: "Ping",
			Handler: func(srv any, ctx context.Context, dec func(any) error, interceptor grpc.UnaryServerInterceptor) (any, error) {
				in := new(emptypb.Empty)
				if err := dec(in); err != nil {
					return nil, err
				}
				h := func(context.Context, any) (any, error) { return &emptypb.Empty{}, nil }
				if interceptor == nil {
					return h(ctx, in)
				}
				return interceptor(ctx, in, &grpc.UnaryServerInfo{Server: srv, FullMethod: NoopMethod}, h)
			},
		}},
	}, struct{}{})
}

// CallNoop calls the baseline RPC.
func CallNoop(ctx context.Context, cc grpc.ClientConnInterface) error {
	return cc.Invoke(ctx, NoopMethod, &emptypb.Empty{}, &emptypb.Empty{})
}

// EchoMethod is the full name of the second baseline RPC that
// [RegisterEcho] adds.
const EchoMethod = "/tokenbroker.bench.Echo/Token"

// RegisterEcho adds a unary RPC that decodes a GetAccessTokenRequest and
// answers with a fixed GetAccessTokenResponse, doing nothing else: the cost
// of carrying a token request and answer through the same server stack, with
// no broker behind it.
func RegisterEcho(s *grpc.Server, answer *pb.GetAccessTokenResponse) {
	s.RegisterService(&grpc.ServiceDesc{
		ServiceName: "tokenbroker.bench.Echo",
		HandlerType: (*any)(nil),
		Methods: []grpc.MethodDesc{{
			MethodName: "Token",
			Handler: func(srv any, ctx context.Context, dec func(any) error, interceptor grpc.UnaryServerInterceptor) (any, error) {
				in := new(pb.GetAccessTokenRequest)
				if err := dec(in); err != nil {
					return nil, err
				}
				h := func(context.Context, any) (any, error) { return answer, nil }
				if interceptor == nil {
					return h(ctx, in)
				}
				return interceptor(ctx, in, &grpc.UnaryServerInfo{Server: srv, FullMethod: EchoMethod}, h)
			},
		}},
	}, struct{}{})
}

// CallEcho calls the echo baseline with req.
func CallEcho(ctx context.Context, cc grpc.ClientConnInterface, req *pb.GetAccessTokenRequest) error {
	return cc.Invoke(ctx, EchoMethod, req, new(pb.GetAccessTokenResponse))
}
