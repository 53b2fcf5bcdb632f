// Command tokenbroker serves tokenbroker.v1.TokenBroker: it keeps OAuth 2.0
// connections to Acumatica ERP tenants and hands their access tokens to
// internal callers.
//
//	tokenbroker [serve] [--listen 127.0.0.1:50051] [--data-dir ./data] ...
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

	"google.golang.org/grpc"

	"tokenbroker/broker"
	"tokenbroker/internal/gcfloor"
	"tokenbroker/server"
	"tokenbroker/storage"
)

func main() {
	args := os.Args[1:]
	if len(args) > 0 && args[0] == "serve" {
		args = args[1:]
	}
	ctx, stop := signal.NotifyContext(context.Background(), syscall.SIGINT, syscall.SIGTERM)
	defer stop()
	if err := run(ctx, args, os.Getenv, os.Stderr); err != nil {
		fmt.Fprintln(os.Stderr, "tokenbroker:", err)
		os.Exit(1)
	}
}

func run(ctx context.Context, args []string, getenv func(string) string, stderr io.Writer) error {
	cfg, err := parseConfig(args, getenv, stderr)
	if err != nil {
		return err
	}
	log := newLogger(cfg, stderr)

	if err := os.MkdirAll(cfg.dataDir, 0o700); err != nil {
		return fmt.Errorf("data dir: %w", err)
	}
	dbPath := filepath.Join(cfg.dataDir, "tokenbroker.db")
	if cfg.etcdEndpoints != "" && cfg.keyFile == "" && getenv("TOKENBROKER_KEY") == "" {
		return errors.New("--etcd-endpoints needs --key-file or TOKENBROKER_KEY: every replica must seal with the same key")
	}
	keys, err := loadKeys(cfg, getenv, dbPath, log)
	if err != nil {
		return err
	}
	st, err := openStore(ctx, cfg, dbPath, keys)
	if err != nil {
		return err
	}
	defer st.close()
	where := dbPath
	if cfg.etcdEndpoints != "" {
		where = "etcd " + cfg.etcdEndpoints + " " + cfg.etcdPrefix
	}

	metrics := server.NewMetrics()
	b, err := broker.New(broker.Options{
		Observer:                     metrics,
		Store:                        st.store,
		Locker:                       st.locker,
		Watcher:                      st.watcher,
		Logger:                       log.With("component", "broker"),
		AllowInsecureUpstream:        cfg.allowInsecureUpstream,
		RejectCooldown:               cmp.Or(cfg.rejectCooldown, -1),
		MaxConcurrentUpstream:        cfg.maxUpstream,
		MaxConcurrentUpstreamPerHost: cfg.maxUpstreamPerHost,
	})
	if err != nil {
		return err
	}
	defer b.Close()
	metrics.Watch(b, time.Now)

	authz, err := loadAuthorizer(cfg)
	if err != nil {
		return err
	}
	var serverOpts []grpc.ServerOption
	if cfg.tlsCert != "" {
		tf, err := server.NewTLSFiles(cfg.tlsCert, cfg.tlsKey, cfg.clientCA)
		if err != nil {
			return err
		}
		serverOpts = append(serverOpts, grpc.Creds(tf.Credentials()))
		go watchFiles(ctx, cfg.reloadInterval, []string{cfg.tlsCert, cfg.tlsKey, cfg.clientCA}, func() {
			if err := tf.Reload(); err != nil {
				log.Error("certificate files changed but cannot be loaded; keeping the old ones", "error", err.Error())
				return
			}
			log.Info("reloaded certificate files")
		})
	}
	if cfg.policy != "" {
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
	var auditor *server.Auditor
	switch cfg.auditLog {
	case "":
	case "-":
		auditor = server.NewAuditor(os.Stdout)
	default:
		f, err := os.OpenFile(cfg.auditLog, os.O_WRONLY|os.O_CREATE|os.O_APPEND, 0o600)
		if err != nil {
			return fmt.Errorf("audit log: %w", err)
		}
		defer f.Close()
		auditor = server.NewAuditor(f)
	}
	if auditor != nil {
		defer auditor.Close()
	}
	srv := server.New(server.Options{
		Broker:                b,
		Logger:                log.With("component", "grpc"),
		AllowInsecureUpstream: cfg.allowInsecureUpstream,
		Authorizer:            authz,
		Auditor:               auditor,
		Metrics:               metrics,
		RateLimit:             cfg.rateLimit,
		RateBurst:             cfg.rateBurst,
		ServerOptions:         serverOpts,
	})
	lis, err := net.Listen("tcp", cfg.listen)
	if err != nil {
		return fmt.Errorf("listen: %w", err)
	}
	if cfg.metricsListen != "" {
		stopMetrics, err := serveMetrics(cfg.metricsListen, metrics, srv, log)
		if err != nil {
			return err
		}
		defer stopMetrics()
	}
	if cfg.healthListen != "" {
		stopHealth, err := serveHealth(cfg.healthListen, srv)
		if err != nil {
			return err
		}
		defer stopHealth()
	}
	mode := "TLS"
	switch {
	case cfg.tlsCert == "":
		mode = "plaintext on loopback (dev mode: no policy, every local caller is an operator and a consumer)"
		log.Warn("dev mode: no authorization policy; every caller on loopback may manage connections and get tokens")
	case cfg.clientCA != "":
		mode = "mTLS"
	}
	start := time.Now()
	log.Info("tokenbroker serving", "listen", lis.Addr().String(), "store", where, "transport", mode, "key_id", keys.PrimaryID())
	fmt.Fprintf(stderr, "tokenbroker: serving on %s (%s), loading connections from %s\n", lis.Addr(), mode, where)

	errc := make(chan error, 2)
	floor := make(chan *gcfloor.Floor, 1)
	go func() { errc <- srv.Serve(lis) }()
	// Serve while loading: a connection not loaded yet is read from the
	// store when first asked for. Maintenance starts once all are loaded.
	go func() {
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
			errc <- err
			return
		}
		// From here on the heap holds every connection; below the floor
		// the collector lets garbage build up instead of running scores
		// of times a second under load.
		if cfg.gcHeapFloorMiB > 0 {
			want := uint64(cfg.gcHeapFloorMiB) << 20
			limit, limited := cgroupMemoryLimit(os.DirFS("/"))
			f := heapFloorFor(want, limit, limited)
			if f < want {
				log.Info("GC heap floor lowered to a quarter of the cgroup's memory limit",
					"gc_heap_floor_mib", f>>20, "memory_limit_mib", limit>>20)
			}
			floor <- gcfloor.Start(f)
		}
		b.Start()
		log.Info("connections loaded", "connections", n, "load", time.Since(start).String())
		fmt.Fprintf(stderr, "tokenbroker: loaded %d connections in %v\n", n, time.Since(start).Round(time.Millisecond))
	}()
	select {
	case err := <-errc:
		return err
	case <-ctx.Done():
	}
	log.Info("shutting down: no new calls; finishing in-flight calls and refreshes")
	srv.Health.Shutdown()
	done := make(chan struct{})
	go func() { srv.GracefulStop(); close(done) }()
	select {
	case <-done:
	case <-time.After(cfg.shutdownTimeout):
		srv.Stop()
	}
	b.Close() // waits for shared refreshes and their commits
	select {
	case f := <-floor:
		f.Stop()
	default:
	}
	log.Info("stopped")
	return nil
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
