package servertest

import (
	"context"

	"google.golang.org/grpc"
	"google.golang.org/protobuf/types/known/emptypb"

	pb "tokenbroker/gen/tokenbroker/v1"
)

// NoopMethod is the full name of the baseline RPC that [RegisterNoop] adds.
const NoopMethod = "/tokenbroker.bench.Noop/Ping"

// QuietMethods are the baselines' full names. Pass them as
// server.Options.QuietMethods, so that the baselines' successful calls are
// logged at debug level as GetAccessToken's are: a comparison with them
// then pays the same logging.
var QuietMethods = []string{NoopMethod, EchoMethod}

// RegisterNoop adds a unary RPC that does nothing to s, so that benchmarks
// can compare an RPC against the same server stack (listener, credentials,
// every interceptor) with no work behind it. Register before s serves.
func RegisterNoop(s *grpc.Server) {
	RegisterUnary(s, "tokenbroker.bench.Noop", "Ping", func() any { return new(emptypb.Empty) },
		func(context.Context, any) (any, error) { return &emptypb.Empty{}, nil })
}

// RegisterUnary adds service/method to s as a unary RPC that decodes its
// request into newReq() and answers with h, through s's interceptors like
// any generated handler. Register before s serves.
func RegisterUnary(s *grpc.Server, service, method string, newReq func() any, h grpc.UnaryHandler) {
	full := "/" + service + "/" + method
	s.RegisterService(&grpc.ServiceDesc{
		ServiceName: service,
		HandlerType: (*any)(nil),
		Methods: []grpc.MethodDesc{{
			MethodName: method,
			Handler: func(srv any, ctx context.Context, dec func(any) error, interceptor grpc.UnaryServerInterceptor) (any, error) {
				in := newReq()
				if err := dec(in); err != nil {
					return nil, err
				}
				if interceptor == nil {
					return h(ctx, in)
				}
				return interceptor(ctx, in, &grpc.UnaryServerInfo{Server: srv, FullMethod: full}, h)
			},
		}},
	}, struct{}{})
}

// CallNoop calls the baseline RPC the way a generated client calls a
// method: a fresh answer, and the method marked static.
func CallNoop(ctx context.Context, cc grpc.ClientConnInterface) error {
	return cc.Invoke(ctx, NoopMethod, &emptypb.Empty{}, &emptypb.Empty{}, grpc.StaticMethod())
}

// EchoMethod is the full name of the second baseline RPC that
// [RegisterEcho] adds.
const EchoMethod = "/tokenbroker.bench.Echo/Token"

// RegisterEcho adds a unary RPC that decodes a GetAccessTokenRequest and
// answers with a fixed GetAccessTokenResponse, doing nothing else: the cost
// of carrying a token request and answer through the same server stack, with
// no broker behind it.
func RegisterEcho(s *grpc.Server, answer *pb.GetAccessTokenResponse) {
	RegisterUnary(s, "tokenbroker.bench.Echo", "Token", func() any { return new(pb.GetAccessTokenRequest) },
		func(context.Context, any) (any, error) { return answer, nil })
}

// CallEcho calls the echo baseline with req, as a generated client would.
func CallEcho(ctx context.Context, cc grpc.ClientConnInterface, req *pb.GetAccessTokenRequest) error {
	return cc.Invoke(ctx, EchoMethod, req, new(pb.GetAccessTokenResponse), grpc.StaticMethod())
}
