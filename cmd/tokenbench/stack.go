package main

import (
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
	"sync/atomic"
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
)

const (
	clientID     = "88358B02-A48D-A50E-F710-39C1636C30F6@MyTenant"
	clientSecret = "bench-client-secret"
	username     = "integration"
	password     = "bench-password"
)

// clock is the real time plus an offset that Advance moves on.
type clock struct{ offset atomic.Int64 }

func (c *clock) Now() time.Time          { return time.Now().Add(time.Duration(c.offset.Load())) }
func (c *clock) Advance(d time.Duration) { c.offset.Add(int64(d)) }

// stack is a full tokenbroker server on loopback, as production runs it
// (logging, metrics, audit, authorization, validation, recovery), with the
// baseline RPCs registered on the same server.
type stack struct {
	idp    *acumaticatest.Server
	idpURL string
	store  *bolt.Store
	conns  []*grpc.ClientConn
	// bare are clients of the echo alone on a bare grpc.NewServer: no
	// interceptors, no broker, over mutual TLS only the same credentials.
	bare    []*grpc.ClientConn
	closers []func()
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
	// mtls serves over mutual TLS with benchPolicy, as production does.
	mtls bool
	// bareEcho also serves the echo on a bare grpc.NewServer (see bare).
	bareEcho bool
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
func mutualTLS(dir string, o *server.Options) credentials.TransportCredentials {
	ca := must(servertest.MakeCA("tokenbench CA"))
	srvCert := must(ca.Make(servertest.Leaf{CN: "tokenbroker", IPs: []net.IP{net.IPv4(127, 0, 0, 1)}, Server: true}))
	cliCert := must(ca.Make(servertest.Leaf{URI: benchIdentity}))
	certPath, keyPath, err := servertest.SavePair(dir, "server", srvCert)
	check(err)
	caPath := filepath.Join(dir, "ca.pem")
	check(os.WriteFile(caPath, ca.PEM, 0o600))
	files := must(server.NewTLSFiles(certPath, keyPath, caPath))
	policy := must(server.ParsePolicy([]byte(benchPolicy)))
	o.ServerOptions, o.Authorizer = []grpc.ServerOption{grpc.Creds(files.Credentials())}, server.NewAuthorizer(policy)
	roots := x509.NewCertPool()
	roots.AddCert(ca.Cert)
	return credentials.NewTLS(&tls.Config{RootCAs: roots, Certificates: []tls.Certificate{cliCert}, MinVersion: tls.VersionTLS12})
}

func newStack(o stackOptions) *stack {
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
	bopts := broker.Options{Now: o.now, TickInterval: -1, MaxConcurrentUpstream: upstreamCap, MaxConcurrentUpstreamPerHost: upstreamCap,
		AllowInsecureUpstream: true} // the stand-in is on loopback
	s.store = must(bolt.Open(filepath.Join(o.dir, "tokenbroker.db"), bolt.Options{Keyring: must(storage.NewKeyring(make([]byte, 32)))}))
	bopts.Store = s.store
	s.closers = append(s.closers, func() { s.store.Close() })
	metrics := server.NewMetrics()
	bopts.Observer = metrics
	if o.observe != nil {
		bopts.Observer = o.observe(metrics)
	}
	b := must(broker.New(bopts))
	s.closers = append(s.closers, b.Close)
	metrics.Watch(b, time.Now)
	auditor := server.NewAuditor(io.Discard)
	s.closers = append(s.closers, func() { auditor.Close() })
	// The baselines are logged as GetAccessToken is, and over mutual TLS
	// open to any caller the policy knows.
	baselines := append(slices.Clone(servertest.QuietMethods), parkMethod)
	sopts := server.Options{Broker: b, AllowInsecureUpstream: true, Logger: slog.New(slog.NewJSONHandler(io.Discard, nil)), Auditor: auditor, Metrics: metrics,
		QuietMethods: baselines, AuthenticatedMethods: baselines}
	clientCreds := insecure.NewCredentials()
	if o.mtls {
		clientCreds = mutualTLS(o.dir, &sopts)
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
	s.conns = s.serveOn(srv.Server, o.conns, clientCreds)
	if o.bareEcho {
		bare := grpc.NewServer(sopts.ServerOptions...) // the TLS credentials, if any
		servertest.RegisterEcho(bare, echo)
		s.bare = s.serveOn(bare, o.conns, clientCreds)
	}
	return s
}

// close closes the clients, the servers, the broker and its store, in the
// reverse of their opening.
func (s *stack) close() {
	for _, f := range slices.Backward(s.closers) {
		f()
	}
}

// serveOn serves srv on a new loopback listener and dials it n times.
func (s *stack) serveOn(srv *grpc.Server, n int, creds credentials.TransportCredentials) []*grpc.ClientConn {
	lis := must(net.Listen("tcp", "127.0.0.1:0"))
	go srv.Serve(lis)
	s.closers = append(s.closers, srv.Stop)
	var conns []*grpc.ClientConn
	for range max(n, 1) {
		cc := must(grpc.NewClient(lis.Addr().String(), grpc.WithTransportCredentials(creds)))
		conns, s.closers = append(conns, cc), append(s.closers, func() { cc.Close() })
	}
	return conns
}

func (s *stack) client(i int) pb.TokenBrokerClient {
	return pb.NewTokenBrokerClient(s.conns[i%len(s.conns)])
}

// createConnections registers n connections on the stand-in.
func (s *stack) createConnections(n int) []string {
	return s.createConnectionsOn(s.idpURL, "t", n)
}

// createConnectionsOn registers n connections on the instance at url
// through the API, 32 at a time, with tenant ids prefix plus a number.
func (s *stack) createConnectionsOn(url, prefix string, n int) []string {
	names := make([]string, n)
	check(parallel(n, 32, func(i int) error {
		tenant := fmt.Sprintf("tenants/%s%06d", prefix, i)
		names[i] = tenant + "/connections/erp"
		_, err := s.client(i).CreateConnection(context.Background(), &pb.CreateConnectionRequest{Parent: tenant, ConnectionId: "erp",
			Connection: &pb.Connection{InstanceUrl: url, ClientId: clientID, ClientSecret: clientSecret, Username: username, Password: password}})
		return err
	}))
	return names
}

// parallel runs f(0) … f(n-1), at most limit at a time, and returns their
// errors.
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
