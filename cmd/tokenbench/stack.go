package main

import (
	"cmp"
	"context"
	"crypto/tls"
	"crypto/x509"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net"
	"net/http"
	"net/http/httptest"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"sync"
	"time"

	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials"
	"google.golang.org/grpc/credentials/insecure"
	"google.golang.org/protobuf/types/known/timestamppb"

	pb "tokenbroker/gen/tokenbroker/v1"

	"tokenbroker/broker"
	"tokenbroker/broker/acumaticatest"
	"tokenbroker/server"
	"tokenbroker/server/servertest"
	"tokenbroker/storage"
	"tokenbroker/storage/etcdtest"
)

const (
	clientID     = "88358B02-A48D-A50E-F710-39C1636C30F6@MyTenant"
	clientSecret = "bench-client-secret"
	username     = "integration"
	password     = "bench-password"
)

// clock is a settable clock.
type clock struct {
	mu sync.Mutex
	t  time.Time
}

func (c *clock) Now() time.Time {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.t
}

func (c *clock) Advance(d time.Duration) {
	c.mu.Lock()
	c.t = c.t.Add(d)
	c.mu.Unlock()
}

// stack is a full tokenbroker server on loopback, as production runs it
// (logging, metrics, audit, authorization, validation, recovery), with the
// baseline RPCs registered on the same server.
type stack struct {
	idp       *acumaticatest.Server
	idpURL    string
	store     stackStore
	conns     []*grpc.ClientConn
	bareConns []*grpc.ClientConn // reach a bare gRPC server (stackOptions.bare)
	closers   []func()
}

// stackStore is the store behind a stack: bbolt, or etcd for replicas.
type stackStore interface {
	broker.Store
	Close() error
}

// upstreamCap is the stack's cap on concurrent upstream token requests:
// the broker's default.
const upstreamCap = broker.DefaultMaxConcurrentUpstream

type stackOptions struct {
	dir     string
	now     func() time.Time
	latency time.Duration
	conns   int                                   // client connections
	wrapIDP func(http.Handler) http.Handler       // wraps the stand-in's handler
	observe func(broker.Observer) broker.Observer // wraps the metrics observer
	park    *parking                              // registers the parked baseline RPC
	etcd    string                                // an etcd endpoint: a replica on it instead of a bbolt file
	perHost int                                   // upstream calls per host (default: the whole cap)
	// upstreamTimeout bounds one token request (default the broker's).
	upstreamTimeout time.Duration
	// mtls serves over mutual TLS with benchPolicy, as production does.
	mtls bool
	// bare also serves the no-op and echo baselines from a bare gRPC server
	// (no options: no interceptors, no broker), plaintext.
	bare bool
}

// benchIdentity is the clients' certificate identity over mutual TLS.
const benchIdentity = "spiffe://tokenbench.test/svc/caller"

// benchPolicy makes benchIdentity operator and consumer. The operators'
// glob names no bench caller; it makes each lookup walk the policy's globs
// too, as a real policy's would.
const benchPolicy = `
rules:
  - identities: ["spiffe://tokenbench.test/ops/*", "` + benchIdentity + `"]
    role: operator
    tenants: ["*"]
  - identities: ["` + benchIdentity + `"]
    role: consumer
    connections: ["tenants/*/connections/*"]
`

// mutualTLS sets o up for mutual TLS with benchPolicy through the
// production code paths (TLS files, policy) and returns the clients'
// credentials.
func mutualTLS(dir string, o *server.Options) (credentials.TransportCredentials, error) {
	ca, err := servertest.MakeCA("tokenbench CA")
	if err != nil {
		return nil, err
	}
	srvCert, err := ca.Make(servertest.Leaf{CN: "tokenbroker", IPs: []net.IP{net.IPv4(127, 0, 0, 1)}, Server: true})
	if err != nil {
		return nil, err
	}
	cliCert, err := ca.Make(servertest.Leaf{URI: benchIdentity})
	if err != nil {
		return nil, err
	}
	certPath, keyPath, err := servertest.SavePair(dir, "server", srvCert)
	if err != nil {
		return nil, err
	}
	caPath := filepath.Join(dir, "ca.pem")
	if err := os.WriteFile(caPath, ca.PEM, 0o600); err != nil {
		return nil, err
	}
	files, err := server.NewTLSFiles(certPath, keyPath, caPath)
	if err != nil {
		return nil, err
	}
	policy, err := server.ParsePolicy([]byte(benchPolicy))
	if err != nil {
		return nil, err
	}
	o.ServerOptions, o.Authorizer = []grpc.ServerOption{grpc.Creds(files.Credentials())}, server.NewAuthorizer(policy)
	roots := x509.NewCertPool()
	roots.AddCert(ca.Cert)
	return credentials.NewTLS(&tls.Config{RootCAs: roots, Certificates: []tls.Certificate{cliCert}, MinVersion: tls.VersionTLS12}), nil
}

// openStore opens the stack's store: a bbolt file in dir, or a replica's
// view of etcd, which also locks and watches.
func openStore(o stackOptions, bopts *broker.Options) (stackStore, func(), error) {
	keys, err := storage.NewKeyring(make([]byte, 32))
	if err != nil {
		return nil, nil, err
	}
	if o.etcd == "" {
		st, err := storage.Open(filepath.Join(o.dir, "tokenbroker.db"), storage.Options{Keyring: keys})
		return st, func() {}, err
	}
	cli, err := etcdtest.NewClient(o.etcd)
	if err != nil {
		return nil, nil, err
	}
	st, err := storage.OpenEtcd(context.Background(), storage.EtcdOptions{Client: cli, Keyring: keys})
	if err != nil {
		cli.Close()
		return nil, nil, err
	}
	bopts.Locker, bopts.Watcher = st, st
	return st, func() { cli.Close() }, nil
}

func newStack(o stackOptions) (*stack, error) {
	s := &stack{idp: acumaticatest.New(acumaticatest.Options{Now: o.now, Latency: o.latency})}
	s.idp.AddClient(clientID, clientSecret)
	s.idp.AddUser(username, password)
	h := s.idp.Handler()
	if o.wrapIDP != nil {
		h = o.wrapIDP(h)
	}
	hs := httptest.NewServer(h)
	s.idpURL, s.closers = hs.URL, []func(){hs.Close}
	// The one stand-in serves for every instance, so one host may use the
	// whole global cap.
	bopts := broker.Options{Now: o.now, TickInterval: -1, MaxConcurrentUpstream: upstreamCap,
		MaxConcurrentUpstreamPerHost: cmp.Or(o.perHost, upstreamCap), UpstreamTimeout: o.upstreamTimeout}
	st, closeClient, err := openStore(o, &bopts)
	if err != nil {
		return nil, err
	}
	s.store, bopts.Store = st, st
	s.closers = append(s.closers, closeClient, func() { st.Close() })
	metrics := server.NewMetrics()
	bopts.Observer = metrics
	if o.observe != nil {
		bopts.Observer = o.observe(metrics)
	}
	b, err := broker.New(bopts)
	if err != nil {
		return nil, err
	}
	s.closers = append(s.closers, b.Close)
	if o.etcd != "" {
		if _, err := b.Load(context.Background()); err != nil {
			return nil, err
		}
		b.Start() // the watch of the other replicas' changes
	}
	metrics.Watch(b, time.Now)
	auditor := server.NewAuditor(io.Discard)
	s.closers = append(s.closers, func() { auditor.Close() })
	// The baselines are logged as GetAccessToken is, and over mutual TLS
	// open to any caller the policy knows.
	baselines := append(slices.Clone(servertest.QuietMethods), parkMethod)
	sopts := server.Options{Broker: b, Logger: slog.New(slog.NewJSONHandler(io.Discard, nil)), Auditor: auditor, Metrics: metrics,
		QuietMethods: baselines, AuthenticatedMethods: baselines}
	clientCreds := insecure.NewCredentials()
	if o.mtls {
		if clientCreds, err = mutualTLS(o.dir, &sopts); err != nil {
			return nil, err
		}
	}
	srv := server.New(sopts)
	servertest.RegisterNoop(srv.Server)
	if o.park != nil {
		o.park.register(srv.Server, s.idpURL)
	}
	// The echo answers with a token response shaped like the real one (the
	// stand-in's token length, this instance URL, the same scopes).
	echo := &pb.GetAccessTokenResponse{AccessToken: "at-" + strings.Repeat("0", 48), TokenType: "Bearer",
		ExpireTime: timestamppb.Now(), InstanceUrl: s.idpURL, Scopes: []string{"api", "offline_access"}}
	servertest.RegisterEcho(srv.Server, echo)
	if s.conns, err = s.serveOn(srv.Server, o.conns, clientCreds); err != nil {
		return nil, err
	}
	if o.bare && !o.mtls {
		bare := grpc.NewServer()
		servertest.RegisterNoop(bare)
		servertest.RegisterEcho(bare, echo)
		if s.bareConns, err = s.serveOn(bare, o.conns, clientCreds); err != nil {
			return nil, err
		}
	}
	return s, nil
}

// close closes the clients, the servers, the broker and its store, in the
// reverse of their opening.
func (s *stack) close() {
	for _, f := range slices.Backward(s.closers) {
		f()
	}
}

// serveOn serves srv on a new loopback listener and dials it n times.
func (s *stack) serveOn(srv *grpc.Server, n int, creds credentials.TransportCredentials) ([]*grpc.ClientConn, error) {
	lis, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		return nil, err
	}
	go srv.Serve(lis)
	s.closers = append(s.closers, srv.Stop)
	var conns []*grpc.ClientConn
	for range max(n, 1) {
		cc, err := grpc.NewClient(lis.Addr().String(), grpc.WithTransportCredentials(creds))
		if err != nil {
			return nil, err
		}
		conns, s.closers = append(conns, cc), append(s.closers, func() { cc.Close() })
	}
	return conns, nil
}

func (s *stack) client(i int) pb.TokenBrokerClient {
	return pb.NewTokenBrokerClient(s.conns[i%len(s.conns)])
}

// createConnections registers n connections on the stand-in.
func (s *stack) createConnections(ctx context.Context, n int) ([]string, error) {
	return s.createConnectionsOn(ctx, s.idpURL, "t", n)
}

// createConnectionsOn registers n connections on the instance at url
// through the API, 32 at a time, with tenant ids prefix plus a number.
func (s *stack) createConnectionsOn(ctx context.Context, url, prefix string, n int) ([]string, error) {
	names := make([]string, n)
	return names, parallel(n, 32, func(i int) error {
		tenant := fmt.Sprintf("tenants/%s%06d", prefix, i)
		names[i] = tenant + "/connections/erp"
		_, err := s.client(i).CreateConnection(ctx, &pb.CreateConnectionRequest{Parent: tenant, ConnectionId: "erp",
			Connection: &pb.Connection{InstanceUrl: url, ClientId: clientID, ClientSecret: clientSecret, Username: username, Password: password}})
		return err
	})
}

// parallel runs f(0) … f(n-1), at most limit at a time, and returns the
// first error.
func parallel(n, limit int, f func(i int) error) error {
	var wg sync.WaitGroup
	sem, errs := make(chan struct{}, limit), make([]error, n)
	for i := range n {
		sem <- struct{}{}
		wg.Go(func() {
			defer func() { <-sem }()
			errs[i] = f(i)
		})
	}
	wg.Wait()
	return errors.Join(errs...)
}
