package server

import (
	"context"
	"io"
	"log/slog"
	"net"
	"testing"

	"google.golang.org/grpc"
	"google.golang.org/grpc/peer"

	pb "tokenbroker/gen/tokenbroker/v1"
)

// BenchmarkRequestLog compares, for a successful GetAccessToken with debug
// lines off, go-grpc-middleware's logging interceptor on its own (which
// builds every field, then drops the line) with requestLog's quiet path.
// Read the two as a ratio: go test -run '^$' -bench RequestLog ./server/
func BenchmarkRequestLog(b *testing.B) {
	log := slog.New(slog.NewJSONHandler(io.Discard, &slog.HandlerOptions{Level: slog.LevelInfo}))
	r := newRequestLog(log, func(context.Context) string { return DevIdentity }, func(context.Context) string { return "" }, nil)
	ctx := peer.NewContext(context.Background(), &peer.Peer{Addr: &net.TCPAddr{IP: net.IPv4(127, 0, 0, 1), Port: 50000}})
	info := &grpc.UnaryServerInfo{FullMethod: pb.TokenBroker_GetAccessToken_FullMethodName}
	req := &pb.GetAccessTokenRequest{Name: "tenants/acme/connections/erp"}
	resp := &pb.GetAccessTokenResponse{}
	handler := func(context.Context, any) (any, error) { return resp, nil }
	for _, m := range []struct {
		name string
		ic   grpc.UnaryServerInterceptor
	}{{"interceptor", r.quietLog}, {"quiet-path", r.unary}} {
		ic := m.ic
		b.Run(m.name, func(b *testing.B) {
			b.ReportAllocs()
			for b.Loop() {
				if _, err := ic(ctx, req, info, handler); err != nil {
					b.Fatal(err)
				}
			}
		})
	}
}
