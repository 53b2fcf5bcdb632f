package server

import (
	"context"
	"fmt"
	"log/slog"
	"runtime/debug"

	"github.com/grpc-ecosystem/go-grpc-middleware/v2/interceptors/logging"
	"github.com/grpc-ecosystem/go-grpc-middleware/v2/interceptors/recovery"
	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/health"
	healthpb "google.golang.org/grpc/health/grpc_health_v1"
	"google.golang.org/grpc/reflection"

	pb "tokenbroker/gen/tokenbroker/v1"

	"tokenbroker/broker"
)

// Options configure [New]. Zero fields mean the documented defaults.
type Options struct {
	// Broker serves the API. Required.
	Broker *broker.Broker
	// Logger receives request logs (method, code, duration; never payloads).
	// Default discards.
	Logger *slog.Logger
	// AllowInsecureUpstream lets instance URLs use http beyond loopback.
	AllowInsecureUpstream bool
	// ServerOptions are added to the grpc.Server (credentials, limits).
	ServerOptions []grpc.ServerOption
}

// Server is the gRPC server with its health service.
type Server struct {
	*grpc.Server
	Health *health.Server
}

// New assembles the gRPC server: logging outermost, then request
// validation, then recovery innermost around the handlers; health and
// reflection registered.
func New(opts Options) *Server {
	log := opts.Logger
	if log == nil {
		log = slog.New(slog.DiscardHandler)
	}
	val := validator{allowInsecure: opts.AllowInsecureUpstream}
	recoverPanic := func(ctx context.Context, p any) error {
		// The panic value is not logged: it could hold request data.
		log.ErrorContext(ctx, "panic recovered in handler", "panic_type", fmt.Sprintf("%T", p), "stack", string(debug.Stack()))
		return withDetails(codes.Internal, "internal error", "INTERNAL", "", 0, nil)
	}
	logOpts := []logging.Option{logging.WithLogOnEvents(logging.FinishCall)}
	so := append([]grpc.ServerOption{
		grpc.ChainUnaryInterceptor(
			logging.UnaryServerInterceptor(slogAdapter(log), logOpts...),
			val.unary,
			recovery.UnaryServerInterceptor(recovery.WithRecoveryHandlerContext(recoverPanic)),
		),
		grpc.ChainStreamInterceptor(
			logging.StreamServerInterceptor(slogAdapter(log), logOpts...),
			recovery.StreamServerInterceptor(recovery.WithRecoveryHandlerContext(recoverPanic)),
		),
	}, opts.ServerOptions...)
	gs := grpc.NewServer(so...)
	pb.RegisterTokenBrokerServer(gs, &service{b: opts.Broker, log: log})
	hs := health.NewServer()
	hs.SetServingStatus("", healthpb.HealthCheckResponse_SERVING)
	hs.SetServingStatus(pb.TokenBroker_ServiceDesc.ServiceName, healthpb.HealthCheckResponse_SERVING)
	healthpb.RegisterHealthServer(gs, hs)
	reflection.Register(gs)
	return &Server{Server: gs, Health: hs}
}

// slogAdapter routes go-grpc-middleware's logging through slog.
func slogAdapter(l *slog.Logger) logging.Logger {
	return logging.LoggerFunc(func(ctx context.Context, lvl logging.Level, msg string, fields ...any) {
		l.Log(ctx, slog.Level(lvl), msg, fields...)
	})
}
