package server

import (
	"context"
	"fmt"
	"log/slog"
	"net/netip"
	"runtime/debug"
	"slices"
	"time"

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

	adminv1 "tokenbroker/gen/tokenbroker/admin/v1"
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
	// AllowInsecureUpstream lets instance URLs use http beyond loopback,
	// and loopback addresses.
	AllowInsecureUpstream bool
	// AllowUpstreamCIDRs are address ranges inside the network that
	// instance URLs may name (see broker.UpstreamRules). Default none.
	AllowUpstreamCIDRs []netip.Prefix
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
	// QuietMethods are full method names of services an embedder registers
	// on Server (it embeds the grpc.Server) beside TokenBroker, whose
	// successful calls are logged at debug level, as GetAccessToken's
	// always are: for hot methods whose every success would otherwise be an
	// info line. Their failures are logged as every other call's.
	QuietMethods []string
	// AuthenticatedMethods are full method names of services an embedder
	// registers beside TokenBroker that any caller the policy knows may
	// call: no policy rule names them. Under a policy, other added methods
	// are denied to every caller.
	AuthenticatedMethods []string
	// Admin, when set, serves tokenbroker.admin.v1.AdminBroker (backup, rekey,
	// key status) over it, to operators of every tenant only.
	Admin AdminStore
}

// tokenBrokerMethods prefixes the full names of TokenBroker's methods.
const tokenBrokerMethods = "/tokenbroker.v1.TokenBroker/"

// Server is the gRPC server with its health service.
type Server struct {
	*grpc.Server
	Health      *health.Server
	stopWatches context.CancelFunc
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
	val := validator{upstream: broker.UpstreamRules{AllowInsecure: opts.AllowInsecureUpstream, AllowCIDRs: opts.AllowUpstreamCIDRs}}
	recoverPanic := func(ctx context.Context, p any) error {
		// The panic value is not logged: it could hold request data.
		log.ErrorContext(ctx, "panic recovered in handler", "panic_type", fmt.Sprintf("%T", p), "stack", string(debug.Stack()))
		return withDetails(codes.Internal, "internal error", "INTERNAL", "", 0, nil)
	}
	reqLog := newRequestLog(log, authz.callerIdentity, authz.callerKind, opts.QuietMethods)
	unary := []grpc.UnaryServerInterceptor{reqLog.unary}
	stream := []grpc.StreamServerInterceptor{reqLog.stream}
	if opts.Metrics != nil {
		unary = append(unary, opts.Metrics.grpc.UnaryServerInterceptor())
		stream = append(stream, opts.Metrics.grpc.StreamServerInterceptor(), opts.Metrics.countWatches)
	}
	if opts.Auditor != nil {
		opts.Auditor.who = authz.callerIdentity
		unary = append(unary, opts.Auditor.unary)
		stream = append(stream, opts.Auditor.stream)
	}
	unary = append(unary, selector.UnaryServerInterceptor(authz.withAuthenticated(opts.AuthenticatedMethods), selector.MatchFunc(needsAuth)))
	stream = append(stream, selector.StreamServerInterceptor(authz.stream, selector.MatchFunc(needsAuth)))
	if opts.RateLimit > 0 {
		rl := &rateLimiter{limit: rate.Limit(opts.RateLimit), burst: max(opts.RateBurst, 1), who: authz.callerKey}
		unary = append(unary, selector.UnaryServerInterceptor(rl.unary, selector.MatchFunc(needsAuth)))
		stream = append(stream, selector.StreamServerInterceptor(rl.stream, selector.MatchFunc(needsAuth)))
	}
	unary = append(unary, val.unary, recovery.UnaryServerInterceptor(recovery.WithRecoveryHandlerContext(recoverPanic)))
	stream = append(stream, recovery.StreamServerInterceptor(recovery.WithRecoveryHandlerContext(recoverPanic)))

	so := append([]grpc.ServerOption{
		grpc.ChainUnaryInterceptor(unary...),
		grpc.ChainStreamInterceptor(stream...),
		grpc.MaxRecvMsgSize(opts.MaxRecvMsgSize),
		grpc.ForceServerCodecV2(newUTF8Codec()),
		grpc.KeepaliveEnforcementPolicy(keepalive.EnforcementPolicy{MinTime: 10 * time.Second, PermitWithoutStream: true}),
		grpc.KeepaliveParams(keepalive.ServerParameters{MaxConnectionIdle: 15 * time.Minute, Time: 2 * time.Minute, Timeout: 20 * time.Second}),
	}, opts.ServerOptions...)
	gs := grpc.NewServer(so...)
	drain, stopWatches := context.WithCancel(context.Background())
	pb.RegisterTokenBrokerServer(gs, &service{b: opts.Broker, log: log, drain: drain})
	if opts.Admin != nil {
		adminv1.RegisterAdminBrokerServer(gs, &adminService{store: opts.Admin, log: log.With("service", "admin")})
	}
	hs := health.NewServer()
	hs.SetServingStatus("", healthpb.HealthCheckResponse_SERVING)
	hs.SetServingStatus(pb.TokenBroker_ServiceDesc.ServiceName, healthpb.HealthCheckResponse_SERVING)
	healthpb.RegisterHealthServer(gs, hs)
	reflection.Register(gs)
	if opts.Metrics != nil {
		opts.Metrics.grpc.InitializeMetrics(gs)
	}
	return &Server{Server: gs, Health: hs, stopWatches: stopWatches}
}

// GracefulStop ends WatchAccessToken streams (UNAVAILABLE, so that their
// callers reconnect elsewhere), then stops as grpc.Server.GracefulStop
// does: a stream never ends by itself, and would hold the stop forever.
func (s *Server) GracefulStop() {
	s.stopWatches()
	s.Server.GracefulStop()
}

// Stop ends WatchAccessToken streams and stops at once.
func (s *Server) Stop() {
	s.stopWatches()
	s.Server.Stop()
}

// requestLog logs every finished call through go-grpc-middleware: quiet
// methods (GetAccessToken and Options.QuietMethods) log success at debug
// level, everything else at the interceptor's default levels.
type requestLog struct {
	log      *slog.Logger
	quiet    map[string]bool
	quietLog grpc.UnaryServerInterceptor // for quiet methods
	loudLog  grpc.UnaryServerInterceptor // for the others
	stream   grpc.StreamServerInterceptor
}

func newRequestLog(log *slog.Logger, who, kind func(context.Context) string, quietMethods []string) *requestLog {
	opts := []logging.Option{
		logging.WithLogOnEvents(logging.FinishCall),
		logging.WithFieldsFromContext(func(ctx context.Context) logging.Fields {
			var f logging.Fields
			if id := who(ctx); id != "" {
				f = logging.Fields{"caller", id}
			}
			// Which kind of certificate identity the policy matched: a URI
			// or DNS SAN, or a subject CN.
			if k := kind(ctx); k != "" {
				f = append(f, "caller_kind", k)
			}
			// A quiet call that failed is logged after the fact; these
			// fields take precedence over the interceptor's own.
			if r, ok := ctx.Value(replayedCall{}).(replayedCall); ok {
				f = append(f, "grpc.start_time", r.start.Format(time.RFC3339))
				f = append(f, logging.DurationToTimeMillisFields(r.took)...)
			}
			return f
		}),
	}
	quietOpts := append(slices.Clone(opts), logging.WithLevels(func(c codes.Code) logging.Level {
		if c == codes.OK {
			return logging.LevelDebug
		}
		return logging.DefaultServerCodeToLevel(c)
	}))
	quiet := map[string]bool{pb.TokenBroker_GetAccessToken_FullMethodName: true}
	for _, m := range quietMethods {
		quiet[m] = true
	}
	return &requestLog{
		log:      log,
		quiet:    quiet,
		quietLog: logging.UnaryServerInterceptor(slogAdapter(log), quietOpts...),
		loudLog:  logging.UnaryServerInterceptor(slogAdapter(log), opts...),
		stream:   logging.StreamServerInterceptor(slogAdapter(log), opts...),
	}
}

// replayedCall is the real start and duration of a quiet call that is
// logged after it finished.
type replayedCall struct {
	start time.Time
	took  time.Duration
}

// unary logs a unary call. The interceptor builds its fields before the
// call, which on a cached GetAccessToken costs more than the broker's own
// work, for a line that is dropped when debug is off. So a quiet call runs
// first, and only when it failed, or debug lines are kept, does it go
// through quietLog; a failed one is replayed with its real start time and
// duration.
func (r *requestLog) unary(ctx context.Context, req any, info *grpc.UnaryServerInfo, handler grpc.UnaryHandler) (any, error) {
	switch {
	case !r.quiet[info.FullMethod]:
		return r.loudLog(ctx, req, info, handler)
	case r.log.Enabled(ctx, slog.LevelDebug):
		return r.quietLog(ctx, req, info, handler)
	}
	start := time.Now()
	resp, err := handler(ctx, req)
	if err == nil {
		return resp, nil
	}
	ctx = context.WithValue(ctx, replayedCall{}, replayedCall{start: start, took: time.Since(start)})
	return r.quietLog(ctx, req, info, func(context.Context, any) (any, error) { return resp, err })
}

// slogAdapter routes go-grpc-middleware's logging through slog.
func slogAdapter(l *slog.Logger) logging.Logger {
	return logging.LoggerFunc(func(ctx context.Context, lvl logging.Level, msg string, fields ...any) {
		l.Log(ctx, slog.Level(lvl), msg, fields...)
	})
}
