// Command tokenbroker serves tokenbroker.v1.TokenBroker: it keeps OAuth 2.0
// connections to Acumatica ERP tenants and hands their access tokens to
// internal callers.
//
//	tokenbroker [serve] [--listen 127.0.0.1:50051] [--data-dir ./data] ...
//	tokenbroker version (or --version)
//	tokenbroker backup|restore|rekey|keys status ... (--help for each)
package main

import (
	"cmp"
	"context"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net"
	"os"
	"os/signal"
	"path/filepath"
	"runtime/debug"
	"syscall"
	"time"

	"go.opentelemetry.io/otel/trace"
	"google.golang.org/grpc"

	"tokenbroker/broker"
	"tokenbroker/internal/gcfloor"
	"tokenbroker/server"
	"tokenbroker/storage"
)

func main() {
	args := os.Args[1:]
	if wantsVersion(args) {
		fmt.Println(versionLine())
		return
	}
	if len(args) > 0 && args[0] == "serve" {
		args = args[1:]
	}
	ctx, stop := signal.NotifyContext(context.Background(), syscall.SIGINT, syscall.SIGTERM)
	defer stop()
	if len(args) > 0 && lifecycleCommands[args[0]] != nil {
		code := runLifecycle(ctx, args[0], lifecycleCommands[args[0]], args[1:], os.Getenv, os.Stdout, os.Stderr)
		stop()
		os.Exit(code)
	}
	if err := run(ctx, args, os.Getenv, os.Stderr); err != nil {
		fmt.Fprintln(os.Stderr, "tokenbroker:", err)
		os.Exit(1)
	}
}

// run serves until ctx ends or serving fails. Each step opens one piece;
// the deferred closes undo them in reverse order.
func run(ctx context.Context, args []string, getenv func(string) string, stderr io.Writer) error {
	cfg, err := parseConfig(args, getenv, stderr)
	if err != nil {
		return err
	}
	log := newLogger(cfg, stderr)
	tr, err := startTracing(ctx, getenv, log)
	if err != nil {
		return err
	}
	defer tr.shutdown()
	st, keys, err := openStorage(ctx, cfg, getenv, log)
	if err != nil {
		return err
	}
	defer st.close()
	metrics := server.NewMetrics()
	b, err := newBroker(cfg, st, metrics, tr.provider, log)
	if err != nil {
		return err
	}
	defer b.Close()
	metrics.Watch(b, time.Now)
	srv, closeAuditor, err := newServer(ctx, cfg, b, st.admin, metrics, tr.serverOptions, log)
	if err != nil {
		return err
	}
	defer closeAuditor()
	go st.watchHealth(ctx, srv.Health, log)
	lis, err := net.Listen("tcp", cfg.listen)
	if err != nil {
		return fmt.Errorf("listen: %w", err)
	}
	stopSidePorts, err := serveSidePorts(cfg, metrics, srv, log)
	if err != nil {
		return err
	}
	defer stopSidePorts()
	announce(cfg, lis, keys, log, stderr)
	return serveUntilDone(ctx, cfg, srv, lis, b, log, stderr)
}

// openStorage opens the configured store with its data key.
func openStorage(ctx context.Context, cfg *config, getenv func(string) string, log *slog.Logger) (*openedStore, *storage.Keyring, error) {
	if err := os.MkdirAll(cfg.dataDir, 0o700); err != nil {
		return nil, nil, fmt.Errorf("data dir: %w", err)
	}
	if cfg.etcdEndpoints != "" && cfg.keyFile == "" && getenv("TOKENBROKER_KEY") == "" {
		return nil, nil, errors.New("--etcd-endpoints needs --key-file or TOKENBROKER_KEY: every replica must seal with the same key")
	}
	keys, err := loadKeys(cfg, getenv, dataFile(cfg), log)
	if err != nil {
		return nil, nil, err
	}
	st, err := openStore(ctx, cfg, dataFile(cfg), keys, log)
	if err != nil {
		return nil, nil, err
	}
	return st, keys, nil
}

// dataFile is the bbolt data file's path.
func dataFile(cfg *config) string {
	return filepath.Join(cfg.dataDir, "tokenbroker.db")
}

// storeName says where connections are stored, for the start-up lines.
func storeName(cfg *config) string {
	if cfg.etcdEndpoints != "" {
		return "etcd " + cfg.etcdEndpoints + " " + cfg.etcdPrefix
	}
	return dataFile(cfg)
}

// newBroker builds the broker on the opened store, reporting to metrics and
// tracing upstream requests to tp.
func newBroker(cfg *config, st *openedStore, metrics *server.Metrics, tp trace.TracerProvider, log *slog.Logger) (*broker.Broker, error) {
	return broker.New(broker.Options{
		Observer:                     metrics,
		TracerProvider:               tp,
		Store:                        st.store,
		Locker:                       st.locker,
		Watcher:                      st.watcher,
		Authorizations:               st.authorizations,
		Logger:                       log.With("component", "broker"),
		AllowInsecureUpstream:        cfg.allowInsecureUpstream,
		AllowUpstreamCIDRs:           cfg.allowUpstreamCIDRs.prefixes,
		RejectCooldown:               cmp.Or(cfg.rejectCooldown, -1),
		MaxConcurrentUpstream:        cfg.maxUpstream,
		MaxConcurrentUpstreamPerHost: cfg.maxUpstreamPerHost,
	})
}

// newServer builds the gRPC server with its transport, policy, auditor,
// admin service and extra options (tracing); closeAuditor flushes and
// closes the audit log.
func newServer(ctx context.Context, cfg *config, b *broker.Broker, admin server.AdminStore, metrics *server.Metrics, extra []grpc.ServerOption, log *slog.Logger) (srv *server.Server, closeAuditor func(), err error) {
	authz, err := loadAuthorizer(cfg)
	if err != nil {
		return nil, nil, err
	}
	serverOpts, err := transportOptions(ctx, cfg, log)
	if err != nil {
		return nil, nil, err
	}
	watchPolicy(ctx, cfg, authz, log)
	auditor, closeAuditor, err := openAuditor(cfg)
	if err != nil {
		return nil, nil, err
	}
	srv = server.New(server.Options{
		Broker:                b,
		Logger:                log.With("component", "grpc"),
		AllowInsecureUpstream: cfg.allowInsecureUpstream,
		AllowUpstreamCIDRs:    cfg.allowUpstreamCIDRs.prefixes,
		Authorizer:            authz,
		Auditor:               auditor,
		Metrics:               metrics,
		RateLimit:             cfg.rateLimit,
		RateBurst:             cfg.rateBurst,
		ServerOptions:         append(serverOpts, extra...),
		Admin:                 admin,
	})
	return srv, closeAuditor, nil
}

// transportOptions gives the server its TLS credentials, re-read when the
// files change; none in plaintext dev mode.
func transportOptions(ctx context.Context, cfg *config, log *slog.Logger) ([]grpc.ServerOption, error) {
	if cfg.tlsCert == "" {
		return nil, nil
	}
	tf, err := server.NewTLSFiles(cfg.tlsCert, cfg.tlsKey, cfg.clientCA)
	if err != nil {
		return nil, err
	}
	go watchFiles(ctx, cfg.reloadInterval, []string{cfg.tlsCert, cfg.tlsKey, cfg.clientCA}, func() {
		if err := tf.Reload(); err != nil {
			log.Error("certificate files changed but cannot be loaded; keeping the old ones", "error", err.Error())
			return
		}
		log.Info("reloaded certificate files")
	})
	return []grpc.ServerOption{grpc.Creds(tf.Credentials())}, nil
}

// watchPolicy reloads the policy file into authz when it changes; a broken
// new file keeps the old policy.
func watchPolicy(ctx context.Context, cfg *config, authz *server.Authorizer, log *slog.Logger) {
	if cfg.policy == "" {
		return
	}
	go watchFiles(ctx, cfg.reloadInterval, []string{cfg.policy}, func() {
		p, err := loadPolicy(cfg.policy)
		if err != nil {
			log.Error("policy file changed but is invalid; keeping the old policy", "error", err.Error())
			return
		}
		authz.SetPolicy(p)
		log.Info("reloaded policy", "file", cfg.policy)
	})
}

// openAuditor opens --audit-log: none, stdout ("-") or a file appended to.
func openAuditor(cfg *config) (auditor *server.Auditor, closeAuditor func(), err error) {
	switch cfg.auditLog {
	case "":
		return nil, func() {}, nil
	case "-":
		a := server.NewAuditor(os.Stdout)
		return a, func() { a.Close() }, nil
	}
	f, err := os.OpenFile(cfg.auditLog, os.O_WRONLY|os.O_CREATE|os.O_APPEND, 0o600)
	if err != nil {
		return nil, nil, fmt.Errorf("audit log: %w", err)
	}
	a := server.NewAuditor(f)
	return a, func() { a.Close(); f.Close() }, nil
}

// serveSidePorts starts the optional metrics and health-only listeners;
// stop closes whichever started.
func serveSidePorts(cfg *config, metrics *server.Metrics, srv *server.Server, log *slog.Logger) (stop func(), err error) {
	var stops []func()
	stop = func() {
		for i := len(stops) - 1; i >= 0; i-- {
			stops[i]()
		}
	}
	if cfg.metricsListen != "" {
		s, err := serveMetrics(cfg.metricsListen, metrics, srv, log)
		if err != nil {
			return nil, err
		}
		stops = append(stops, s)
	}
	if cfg.healthListen != "" {
		s, err := serveHealth(cfg.healthListen, srv)
		if err != nil {
			stop()
			return nil, err
		}
		stops = append(stops, s)
	}
	return stop, nil
}

// announce says where the server listens, how callers are authenticated
// and which key seals.
func announce(cfg *config, lis net.Listener, keys *storage.Keyring, log *slog.Logger, stderr io.Writer) {
	mode := "TLS"
	switch {
	case cfg.tlsCert == "":
		mode = "plaintext on loopback (dev mode: no policy, every local caller is an operator and a consumer)"
		log.Warn("dev mode: no authorization policy; every caller on loopback may manage connections and get tokens")
	case cfg.clientCA != "":
		mode = "mTLS"
	}
	log.Info("tokenbroker serving", "version", versionLine(), "listen", lis.Addr().String(), "store", storeName(cfg), "transport", mode, "key_id", keys.PrimaryID())
	fmt.Fprintf(stderr, "tokenbroker: serving on %s (%s), loading connections from %s\n", lis.Addr(), mode, storeName(cfg))
}

// serveUntilDone serves while connections load in the background, until
// ctx ends (then it shuts down) or serving or loading fails.
func serveUntilDone(ctx context.Context, cfg *config, srv *server.Server, lis net.Listener, b *broker.Broker, log *slog.Logger, stderr io.Writer) error {
	errc := make(chan error, 2)
	floor := make(chan *gcfloor.Floor, 1)
	go func() { errc <- srv.Serve(lis) }()
	go func() {
		if err := loadThenMaintain(ctx, cfg, b, floor, log, stderr); err != nil {
			errc <- err
		}
	}()
	select {
	case err := <-errc:
		return err
	case <-ctx.Done():
	}
	shutDown(cfg, srv, b, log)
	select {
	case f := <-floor:
		f.Stop()
	default:
	}
	log.Info("stopped")
	return nil
}

// loadThenMaintain loads every connection, then starts the heap floor and
// the broker's maintenance. Until a connection is loaded, it is read from
// the store when first asked for.
func loadThenMaintain(ctx context.Context, cfg *config, b *broker.Broker, floor chan<- *gcfloor.Floor, log *slog.Logger, stderr io.Writer) error {
	start := time.Now()
	// Loading keeps most of what it allocates, interleaved with the
	// decoder's garbage. Collecting often while it runs lets the kept
	// records fill the freed slots, so fewer half-empty spans are left
	// (at 100k connections: 248 MB of heap in use instead of 289 MB at
	// GOGC=400); then the free pages go back to the OS.
	gcPercent := debug.SetGCPercent(50)
	n, err := b.Load(ctx)
	debug.SetGCPercent(gcPercent)
	debug.FreeOSMemory()
	if err != nil {
		return err
	}
	if f := startHeapFloor(cfg, log); f != nil {
		floor <- f
	}
	b.Start()
	log.Info("connections loaded", "connections", n, "load", time.Since(start).String())
	fmt.Fprintf(stderr, "tokenbroker: loaded %d connections in %v\n", n, time.Since(start).Round(time.Millisecond))
	return nil
}

// startHeapFloor starts the GC heap floor (--gc-heap-floor-mib), at most a
// quarter of the cgroup's memory limit; nil when it is off. From here on
// the heap holds every connection; below the floor the collector lets
// garbage build up instead of running scores of times a second under load.
func startHeapFloor(cfg *config, log *slog.Logger) *gcfloor.Floor {
	if cfg.gcHeapFloorMiB <= 0 {
		return nil
	}
	want := uint64(cfg.gcHeapFloorMiB) << 20
	limit, limited := cgroupMemoryLimit(os.DirFS("/"))
	f := heapFloorFor(want, limit, limited)
	if f < want {
		log.Info("GC heap floor lowered to a quarter of the cgroup's memory limit",
			"gc_heap_floor_mib", f>>20, "memory_limit_mib", limit>>20)
	}
	return gcfloor.Start(f)
}

// shutDown stops taking calls, lets in-flight calls finish within
// --shutdown-timeout, then waits for shared refreshes and their commits.
func shutDown(cfg *config, srv *server.Server, b *broker.Broker, log *slog.Logger) {
	log.Info("shutting down: no new calls; finishing in-flight calls and refreshes")
	srv.Health.Shutdown()
	b.EndWatches() // a watch never ends by itself: the graceful stop would wait for it
	done := make(chan struct{})
	go func() { srv.GracefulStop(); close(done) }()
	select {
	case <-done:
	case <-time.After(cfg.shutdownTimeout):
		srv.Stop()
	}
	b.Close() // waits for shared refreshes and their commits
}

func newLogger(cfg *config, w io.Writer) *slog.Logger {
	var level slog.Level
	if err := level.UnmarshalText([]byte(cfg.logLevel)); err != nil {
		level = slog.LevelInfo
	}
	hopts := &slog.HandlerOptions{Level: level}
	if cfg.logFormat == "text" {
		return slog.New(slog.NewTextHandler(w, hopts))
	}
	return slog.New(slog.NewJSONHandler(w, hopts))
}

// loadKeys finds the data key: TOKENBROKER_KEY, --key-file, or the dev-mode
// key file in the data dir, generated (0600) on first start.
func loadKeys(cfg *config, getenv func(string) string, dbPath string, log *slog.Logger) (*storage.Keyring, error) {
	if v := getenv("TOKENBROKER_KEY"); v != "" {
		k, err := storage.ParseKeys([]byte(v))
		if err != nil {
			return nil, fmt.Errorf("TOKENBROKER_KEY: %w", err)
		}
		return k, nil
	}
	if cfg.keyFile != "" {
		return storage.LoadKeyFile(cfg.keyFile)
	}
	path := filepath.Join(cfg.dataDir, "tokenbroker.key")
	if _, err := os.Stat(path); errors.Is(err, os.ErrNotExist) {
		if info, err := os.Stat(dbPath); err == nil && info.Size() > 0 {
			return nil, fmt.Errorf("%s exists but its key file %s is missing; restore the key file or give --key-file (a new key cannot open the existing data)", dbPath, path)
		}
	}
	k, generated, err := storage.LoadOrGenerateKeyFile(path)
	if err != nil {
		return nil, err
	}
	if generated {
		log.Warn("generated a new data key (dev mode); back it up with the data file, or give --key-file in production", "key_file", path, "key_id", k.PrimaryID())
	}
	return k, nil
}
