package server

import (
	"context"
	"fmt"
	"log/slog"
	"runtime/debug"
	"slices"
	"time"

	"github.com/grpc-ecosystem/go-grpc-middleware/v2/interceptors"
	"github.com/grpc-ecosystem/go-grpc-middleware/v2/interceptors/logging"
	"github.com/grpc-ecosystem/go-grpc-middleware/v2/interceptors/recovery"
	"github.com/grpc-ecosystem/go-grpc-middleware/v2/interceptors/selector"
	"golang.org/x/time/rate"
	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/health"
	healthpb "google.golang.org/grpc/health/grpc_health_v1"
	"google.golang.org/grpc/keepalive"
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
	// Authorizer decides who may call what. Default dev mode (everyone).
	Authorizer *Authorizer
	// Auditor records every TokenBroker call. Default none.
	Auditor *Auditor
	// Metrics collects gRPC server metrics. Default none.
	Metrics *Metrics
	// RateLimit is each caller's sustained calls per second, RateBurst its
	// burst. Default 0: no limit.
	RateLimit float64
	RateBurst int
	// MaxRecvMsgSize bounds request size. Default 64 KiB (a connection with
	// every field at its limit is well below).
	MaxRecvMsgSize int
	// ServerOptions are added to the grpc.Server (credentials).
	ServerOptions []grpc.ServerOption
	// QuietMethods are full method names whose successful calls are logged
	// at debug level, like GetAccessToken's always are: they are the hot
	// path, and the audit log records each token issued. Their failures
	// are logged as every other call's.
	QuietMethods []string
}

// Server is the gRPC server with its health service.
type Server struct {
	*grpc.Server
	Health *health.Server
}

// New assembles the gRPC server. Interceptors, outermost first: logging,
// metrics, audit, authentication and authorization (every service but
// health), per-caller rate limit, request validation, recovery. Health and
// reflection are registered.
func New(opts Options) *Server {
	log := opts.Logger
	if log == nil {
		log = slog.New(slog.DiscardHandler)
	}
	authz := opts.Authorizer
	if authz == nil {
		authz = NewAuthorizer(nil)
	}
	if opts.MaxRecvMsgSize <= 0 {
		opts.MaxRecvMsgSize = 64 << 10
	}
	val := validator{allowInsecure: opts.AllowInsecureUpstream}
	recoverPanic := func(ctx context.Context, p any) error {
		// The panic value is not logged: it could hold request data.
		log.ErrorContext(ctx, "panic recovered in handler", "panic_type", fmt.Sprintf("%T", p), "stack", string(debug.Stack()))
		return withDetails(codes.Internal, "internal error", "INTERNAL", "", 0, nil)
	}
	logOpts := []logging.Option{
		logging.WithLogOnEvents(logging.FinishCall),
		logging.WithFieldsFromContext(func(ctx context.Context) logging.Fields {
			if id := authz.callerIdentity(ctx); id != "" {
				return logging.Fields{"caller", id}
			}
			return nil
		}),
	}
	quiet := map[string]bool{pb.TokenBroker_GetAccessToken_FullMethodName: true}
	for _, m := range opts.QuietMethods {
		quiet[m] = true
	}
	isQuiet := selector.MatchFunc(func(_ context.Context, c interceptors.CallMeta) bool { return quiet[c.FullMethod()] })
	quietOpts := append(slices.Clone(logOpts), logging.WithLevels(func(c codes.Code) logging.Level {
		if c == codes.OK {
			return logging.LevelDebug
		}
		return logging.DefaultServerCodeToLevel(c)
	}))
	var unary []grpc.UnaryServerInterceptor
	var stream []grpc.StreamServerInterceptor
	unary = append(unary,
		selector.UnaryServerInterceptor(logging.UnaryServerInterceptor(slogAdapter(log), quietOpts...), isQuiet),
		selector.UnaryServerInterceptor(logging.UnaryServerInterceptor(slogAdapter(log), logOpts...), not(isQuiet)))
	stream = append(stream, logging.StreamServerInterceptor(slogAdapter(log), logOpts...))
	if opts.Metrics != nil {
		unary = append(unary, opts.Metrics.grpc.UnaryServerInterceptor())
		stream = append(stream, opts.Metrics.grpc.StreamServerInterceptor())
	}
	if opts.Auditor != nil {
		opts.Auditor.who = authz.callerIdentity
		unary = append(unary, opts.Auditor.unary)
	}
	unary = append(unary, selector.UnaryServerInterceptor(authz.unary, selector.MatchFunc(needsAuth)))
	stream = append(stream, selector.StreamServerInterceptor(authz.stream, selector.MatchFunc(needsAuth)))
	if opts.RateLimit > 0 {
		rl := &rateLimiter{limit: rate.Limit(opts.RateLimit), burst: max(opts.RateBurst, 1), who: authz.callerIdentity}
		unary = append(unary, selector.UnaryServerInterceptor(rl.unary, selector.MatchFunc(needsAuth)))
	}
	unary = append(unary, val.unary, recovery.UnaryServerInterceptor(recovery.WithRecoveryHandlerContext(recoverPanic)))
	stream = append(stream, recovery.StreamServerInterceptor(recovery.WithRecoveryHandlerContext(recoverPanic)))

	so := append([]grpc.ServerOption{
		grpc.ChainUnaryInterceptor(unary...),
		grpc.ChainStreamInterceptor(stream...),
		grpc.MaxRecvMsgSize(opts.MaxRecvMsgSize),
		grpc.KeepaliveEnforcementPolicy(keepalive.EnforcementPolicy{MinTime: 10 * time.Second, PermitWithoutStream: true}),
		grpc.KeepaliveParams(keepalive.ServerParameters{MaxConnectionIdle: 15 * time.Minute, Time: 2 * time.Minute, Timeout: 20 * time.Second}),
	}, opts.ServerOptions...)
	gs := grpc.NewServer(so...)
	pb.RegisterTokenBrokerServer(gs, &service{b: opts.Broker, log: log})
	hs := health.NewServer()
	hs.SetServingStatus("", healthpb.HealthCheckResponse_SERVING)
	hs.SetServingStatus(pb.TokenBroker_ServiceDesc.ServiceName, healthpb.HealthCheckResponse_SERVING)
	healthpb.RegisterHealthServer(gs, hs)
	reflection.Register(gs)
	if opts.Metrics != nil {
		opts.Metrics.grpc.InitializeMetrics(gs)
	}
	return &Server{Server: gs, Health: hs}
}

// not inverts a selector's match.
func not(m selector.Matcher) selector.Matcher {
	return selector.MatchFunc(func(ctx context.Context, c interceptors.CallMeta) bool { return !m.Match(ctx, c) })
}

// slogAdapter routes go-grpc-middleware's logging through slog.
func slogAdapter(l *slog.Logger) logging.Logger {
	return logging.LoggerFunc(func(ctx context.Context, lvl logging.Level, msg string, fields ...any) {
		l.Log(ctx, slog.Level(lvl), msg, fields...)
	})
}
