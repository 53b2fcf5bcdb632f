package main

import (
	"context"
	"crypto/tls"
	"crypto/x509"
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
	"tokenbroker/storage/bolt"
	"tokenbroker/storage/etcd"
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
// (logging, metrics, audit, authorization in dev mode, validation,
// recovery), with the no-op baseline RPC registered on the same server.
type stack struct {
	idp    *acumaticatest.Server
	idpURL string
	store  stackStore
	b      *broker.Broker
	srv    *server.Server
	addr   string
	conns  []*grpc.ClientConn
	// bareConns reach a bare gRPC server (stackOptions.bare).
	bareConns []*grpc.ClientConn
	close     func()
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
	etcd    string                                // an etcd endpoint: run as a replica on it instead of a bbolt file
	perHost int                                   // upstream calls per host (default: the whole cap)
	// upstreamTimeout bounds one token request (default the broker's).
	upstreamTimeout time.Duration
	// mtls serves over mutual TLS with a policy, as production does: the
	// clients present a certificate the policy makes operator and consumer,
	// and the baselines are open to any caller the policy knows.
	mtls bool
	// bare also serves the no-op and echo baselines from a second, bare
	// gRPC server (grpc.NewServer with no options: no interceptors, no
	// broker) on its own loopback listener, reached through bareConns.
	// Plaintext only: not with mtls.
	bare bool
}

// benchIdentity is the clients' certificate identity over mutual TLS.
const benchIdentity = "spiffe://tokenbench.test/svc/caller"

// benchPolicy grants benchIdentity what the benchmarks do: create
// connections and get their tokens. The operators' glob names no bench
// caller; it makes each lookup walk the policy's globs too, as a real
// policy's would.
const benchPolicy = `
rules:
  - identities: ["spiffe://tokenbench.test/ops/*", "` + benchIdentity + `"]
    role: operator
    tenants: ["*"]
  - identities: ["` + benchIdentity + `"]
    role: consumer
    connections: ["tenants/*/connections/*"]
`

// mutualTLS returns the server options and client credentials of a stack
// served over mutual TLS with benchPolicy, through the production code
// paths (TLS files, policy, per-connection identity).
func mutualTLS(dir string) ([]grpc.ServerOption, *server.Authorizer, credentials.TransportCredentials, error) {
	ca, err := servertest.MakeCA("tokenbench CA")
	if err != nil {
		return nil, nil, nil, err
	}
	srvCert, err := ca.Make(servertest.Leaf{CN: "tokenbroker", IPs: []net.IP{net.IPv4(127, 0, 0, 1)}, Server: true})
	if err != nil {
		return nil, nil, nil, err
	}
	cliCert, err := ca.Make(servertest.Leaf{URI: benchIdentity})
	if err != nil {
		return nil, nil, nil, err
	}
	certPath, keyPath, err := servertest.SavePair(dir, "server", srvCert)
	if err != nil {
		return nil, nil, nil, err
	}
	caPath := filepath.Join(dir, "ca.pem")
	if err := os.WriteFile(caPath, ca.PEM, 0o600); err != nil {
		return nil, nil, nil, err
	}
	files, err := server.NewTLSFiles(certPath, keyPath, caPath)
	if err != nil {
		return nil, nil, nil, err
	}
	policy, err := server.ParsePolicy([]byte(benchPolicy))
	if err != nil {
		return nil, nil, nil, err
	}
	roots := x509.NewCertPool()
	roots.AddCert(ca.Cert)
	creds := credentials.NewTLS(&tls.Config{RootCAs: roots, Certificates: []tls.Certificate{cliCert}, MinVersion: tls.VersionTLS12})
	return []grpc.ServerOption{grpc.Creds(files.Credentials())}, server.NewAuthorizer(policy), creds, nil
}

// stackStore is the store behind a stack: bbolt, or etcd for replicas.
type stackStore interface {
	broker.Store
	Close() error
}

func newStack(o stackOptions) (*stack, error) {
	s := &stack{}
	s.idp = acumaticatest.New(acumaticatest.Options{Now: o.now, Latency: o.latency})
	s.idp.AddClient(clientID, clientSecret)
	s.idp.AddUser(username, password)
	h := s.idp.Handler()
	if o.wrapIDP != nil {
		h = o.wrapIDP(h)
	}
	hs := httptest.NewServer(h)
	s.idpURL = hs.URL
	keys, err := storage.NewKeyring(make([]byte, 32))
	if err != nil {
		return nil, err
	}
	// The one stand-in serves for every instance, so one host may use the
	// whole global cap.
	bopts := broker.Options{Now: o.now, TickInterval: -1, MaxConcurrentUpstream: upstreamCap, MaxConcurrentUpstreamPerHost: upstreamCap,
		UpstreamTimeout: o.upstreamTimeout, AllowInsecureUpstream: true} // the stand-in is on loopback
	if o.perHost > 0 {
		bopts.MaxConcurrentUpstreamPerHost = o.perHost
	}
	closeClient := func() {}
	if o.etcd != "" {
		cli, err := etcdtest.NewClient(o.etcd)
		if err != nil {
			return nil, err
		}
		st, err := etcd.Open(context.Background(), etcd.Options{Client: cli, Keyring: keys})
		if err != nil {
			cli.Close()
			return nil, err
		}
		s.store, bopts.Locker, bopts.Watcher = st, st, st
		closeClient = func() { cli.Close() }
	} else {
		st, err := bolt.Open(filepath.Join(o.dir, "tokenbroker.db"), bolt.Options{Keyring: keys})
		if err != nil {
			return nil, err
		}
		s.store = st
	}
	st := s.store
	bopts.Store = st
	metrics := server.NewMetrics()
	bopts.Observer = metrics
	if o.observe != nil {
		bopts.Observer = o.observe(metrics)
	}
	b, err := broker.New(bopts)
	if err != nil {
		return nil, err
	}
	s.b = b
	if o.etcd != "" {
		if _, err := b.Load(context.Background()); err != nil {
			return nil, err
		}
		b.Start() // the watch of the other replicas' changes
	}
	metrics.Watch(b, time.Now)
	auditor := server.NewAuditor(io.Discard)
	baselines := append(slices.Clone(servertest.QuietMethods), parkMethod)
	sopts := server.Options{
		Broker:                b,
		AllowInsecureUpstream: true,
		Logger:                slog.New(slog.NewJSONHandler(io.Discard, nil)),
		Auditor:               auditor,
		Metrics:               metrics,
		// The baselines are logged as GetAccessToken is.
		QuietMethods: baselines,
	}
	clientCreds := insecure.NewCredentials()
	if o.mtls {
		var err error
		if sopts.ServerOptions, sopts.Authorizer, clientCreds, err = mutualTLS(o.dir); err != nil {
			return nil, err
		}
		sopts.AuthenticatedMethods = baselines
	}
	s.srv = server.New(sopts)
	servertest.RegisterNoop(s.srv.Server)
	if o.park != nil {
		o.park.register(s.srv.Server, s.idpURL)
	}
	// The echo baseline answers with a token response shaped like the real
	// one (the stand-in's token length, this instance URL, the same scopes).
	echoAnswer := &pb.GetAccessTokenResponse{
		AccessToken: "at-" + strings.Repeat("0", 48), TokenType: "Bearer", ExpireTime: timestamppb.Now(),
		InstanceUrl: s.idpURL, Scopes: []string{"api", "offline_access"},
	}
	servertest.RegisterEcho(s.srv.Server, echoAnswer)
	if s.addr, s.conns, err = serveOn(s.srv.Server, o.conns, clientCreds); err != nil {
		return nil, err
	}
	bare := grpc.NewServer()
	if o.bare && !o.mtls {
		servertest.RegisterNoop(bare)
		servertest.RegisterEcho(bare, echoAnswer)
		if _, s.bareConns, err = serveOn(bare, o.conns, clientCreds); err != nil {
			return nil, err
		}
	}
	s.close = func() {
		for _, cc := range append(slices.Clone(s.conns), s.bareConns...) {
			cc.Close()
		}
		bare.Stop()
		s.srv.Stop()
		b.Close()
		auditor.Close()
		st.Close()
		closeClient()
		hs.Close()
	}
	return s, nil
}

// serveOn serves srv on a new loopback listener and dials it n times
// (at least once).
func serveOn(srv *grpc.Server, n int, creds credentials.TransportCredentials) (string, []*grpc.ClientConn, error) {
	lis, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		return "", nil, err
	}
	go srv.Serve(lis)
	var conns []*grpc.ClientConn
	for range max(n, 1) {
		cc, err := grpc.NewClient(lis.Addr().String(), grpc.WithTransportCredentials(creds))
		if err != nil {
			return "", nil, err
		}
		conns = append(conns, cc)
	}
	return lis.Addr().String(), conns, nil
}

func (s *stack) client(i int) pb.TokenBrokerClient {
	return pb.NewTokenBrokerClient(s.conns[i%len(s.conns)])
}

// createConnections registers n connections on the stand-in, concurrently,
// through the API.
func (s *stack) createConnections(ctx context.Context, n int) ([]string, error) {
	return s.createConnectionsOn(ctx, s.idpURL, "t", n)
}

// createConnectionsOn registers n connections on the instance at url, with
// tenant ids prefix plus a number.
func (s *stack) createConnectionsOn(ctx context.Context, url, prefix string, n int) ([]string, error) {
	names := make([]string, n)
	errs := make(chan error, n)
	sem := make(chan struct{}, 32)
	var wg sync.WaitGroup
	for i := range n {
		tenant := fmt.Sprintf("tenants/%s%06d", prefix, i)
		names[i] = tenant + "/connections/erp"
		wg.Add(1)
		sem <- struct{}{}
		go func() {
			defer wg.Done()
			defer func() { <-sem }()
			_, err := s.client(i).CreateConnection(ctx, &pb.CreateConnectionRequest{
				Parent: tenant, ConnectionId: "erp",
				Connection: &pb.Connection{InstanceUrl: url, ClientId: clientID, ClientSecret: clientSecret, Username: username, Password: password},
			})
			if err != nil {
				errs <- err
			}
		}()
	}
	wg.Wait()
	close(errs)
	if err := <-errs; err != nil {
		return nil, err
	}
	return names, nil
}
