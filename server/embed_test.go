package server_test

import (
	"context"
	"log/slog"
	"net"
	"strings"
	"testing"

	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/credentials/insecure"
	"google.golang.org/grpc/status"
	"google.golang.org/protobuf/types/known/emptypb"

	"tokenbroker/internal/testkit"
	"tokenbroker/server"
	"tokenbroker/server/servertest"
)

// An embedder's own methods registered beside TokenBroker are logged like
// any call, at info level when they succeed, unless named in QuietMethods:
// then a success is logged at debug level, as GetAccessToken's is, and a
// failure still at its usual level.
func TestQuietMethodsLogOnlyTheirFailuresAtInfo(t *testing.T) {
	const loudMethod, failMethod = "/embedder.Loud/Call", "/embedder.Fail/Call"
	logs := &testkit.LockedBuffer{}
	srv := server.New(server.Options{
		Logger:       slog.New(slog.NewJSONHandler(logs, nil)),
		QuietMethods: []string{servertest.NoopMethod, failMethod},
	})
	servertest.RegisterNoop(srv.Server)
	ok := func(context.Context, any) (any, error) { return &emptypb.Empty{}, nil }
	fail := func(context.Context, any) (any, error) {
		return nil, status.Error(codes.FailedPrecondition, "embedder refused")
	}
	servertest.RegisterUnary(srv.Server, "embedder.Loud", "Call", func() any { return new(emptypb.Empty) }, ok)
	servertest.RegisterUnary(srv.Server, "embedder.Fail", "Call", func() any { return new(emptypb.Empty) }, fail)
	lis, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	go srv.Serve(lis)
	t.Cleanup(srv.Stop)
	cc, err := grpc.NewClient(lis.Addr().String(), grpc.WithTransportCredentials(insecure.NewCredentials()))
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { cc.Close() })
	ctx := context.Background()
	if err := servertest.CallNoop(ctx, cc); err != nil {
		t.Fatal(err)
	}
	for _, m := range []string{loudMethod, failMethod} {
		_ = cc.Invoke(ctx, m, &emptypb.Empty{}, &emptypb.Empty{})
	}
	srv.GracefulStop()
	out := logs.String()
	if strings.Contains(out, "tokenbroker.bench.Noop") {
		t.Errorf("a quiet method's success was logged at info:\n%s", out)
	}
	if !strings.Contains(out, `"grpc.service":"embedder.Loud"`) {
		t.Errorf("a method not named quiet was not logged:\n%s", out)
	}
	if !strings.Contains(out, `"grpc.service":"embedder.Fail"`) || !strings.Contains(out, "FailedPrecondition") {
		t.Errorf("a quiet method's failure was not logged:\n%s", out)
	}
}
