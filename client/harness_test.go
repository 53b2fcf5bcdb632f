package client_test

import (
	"context"
	"io"
	"net"
	"net/http"
	"net/http/httptest"
	"net/netip"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/credentials/insecure"
	"google.golang.org/grpc/status"

	pb "tokenbroker/gen/tokenbroker/v1"

	"tokenbroker/broker"
	"tokenbroker/broker/acumaticatest"
	"tokenbroker/server"
	"tokenbroker/storage"
	"tokenbroker/storage/bolt"
)

const (
	clientID     = "88358B02-A48D-A50E-F710-39C1636C30F6@MyTenant"
	clientSecret = "CLI-client-secret-5e0d2c71"
	username     = "integration"
	password     = "CLI-user-password-0b9f33a4"
	erp          = "tenants/acme/connections/erp"
)

var loopback = []netip.Prefix{netip.MustParsePrefix("127.0.0.0/8"), netip.MustParsePrefix("::1/128")}

// clock is a settable clock shared by the broker, the stand-in and the
// client. Every reading moves it on by a microsecond, as real time does:
// a token handed out is seen after it was issued.
type clock struct {
	mu sync.Mutex
	t  time.Time
}

func newClock() *clock { return &clock{t: time.Date(2026, 11, 30, 9, 0, 0, 0, time.UTC)} }

func (c *clock) Now() time.Time {
	c.mu.Lock()
	defer c.mu.Unlock()
	c.t = c.t.Add(time.Microsecond)
	return c.t
}

func (c *clock) Advance(d time.Duration) {
	c.mu.Lock()
	defer c.mu.Unlock()
	c.t = c.t.Add(d)
}

// rig is a real broker (bbolt file, gRPC server on loopback) in front of
// the Acumatica stand-in, with one connection, erp.
type rig struct {
	idp     *acumaticatest.Server
	idpURL  string
	b       *broker.Broker
	addr    string
	srv     *server.Server
	clock   *clock           // with rigOptions.fake
	now     func() time.Time // the rig's clock: time.Now or clock.Now
	unary   atomic.Int64     // GetAccessToken calls through dial's connections
	reports atomic.Int64     // of which carried rejected_access_token
	streams atomic.Int64     // WatchAccessToken streams opened
	open    atomic.Int64     // of which have not ended yet
	noWatch atomic.Bool      // fail every WatchAccessToken stream at the client
	cleanup []func()
}

type rigOptions struct {
	idp    acumaticatest.Options
	broker broker.Options
	fake   bool // a settable clock for the stand-in, the broker and clients (rig.now)
}

// newRig starts the rig; close it with rig.close. It panics on failure so
// that examples can use it too.
func newRig(opts rigOptions) *rig {
	r := &rig{now: time.Now}
	if opts.fake {
		r.clock = newClock()
		r.now = r.clock.Now
	}
	if opts.idp.Now == nil {
		opts.idp.Now = r.now
	}
	r.idp = acumaticatest.New(opts.idp)
	r.idp.AddClient(clientID, clientSecret)
	r.idp.AddUser(username, password)
	hs := httptest.NewServer(instanceHandler(r.idp.Handler()))
	r.cleanup = append(r.cleanup, hs.Close)
	r.idpURL = hs.URL

	dir, err := os.MkdirTemp("", "tokenbroker-client-")
	must(err)
	r.cleanup = append(r.cleanup, func() { os.RemoveAll(dir) })
	keys, err := storage.NewKeyring(make([]byte, 32))
	must(err)
	st, err := bolt.Open(filepath.Join(dir, "tokenbroker.db"), bolt.Options{Keyring: keys, Now: r.now})
	must(err)
	bo := opts.broker
	bo.Store = st
	bo.AllowUpstreamCIDRs = loopback // the stand-in listens on loopback
	if bo.Now == nil {
		bo.Now = r.now
	}
	if bo.TickInterval == 0 {
		bo.TickInterval = -1
	}
	r.b, err = broker.New(bo)
	must(err)
	r.b.Start()
	r.srv = server.New(server.Options{Broker: r.b, AllowUpstreamCIDRs: loopback})
	lis, err := net.Listen("tcp", "127.0.0.1:0")
	must(err)
	go r.srv.Serve(lis)
	r.addr = lis.Addr().String()
	r.cleanup = append(r.cleanup, func() { r.srv.Stop(); r.b.Close(); st.Close() })

	_, err = r.b.CreateConnection(context.Background(), &storage.Connection{
		Name: erp, InstanceURL: r.idpURL, ClientID: clientID, ClientSecret: clientSecret, Username: username, Password: password,
	}, false)
	must(err)
	return r
}

func (r *rig) close() {
	for i := len(r.cleanup) - 1; i >= 0; i-- {
		r.cleanup[i]()
	}
}

// dial connects to the broker, counting calls.
func (r *rig) dial() *grpc.ClientConn {
	cc, err := grpc.NewClient(r.addr, grpc.WithTransportCredentials(insecure.NewCredentials()),
		grpc.WithUnaryInterceptor(func(ctx context.Context, method string, req, reply any, cc *grpc.ClientConn, invoker grpc.UnaryInvoker, opts ...grpc.CallOption) error {
			if g, ok := req.(*pb.GetAccessTokenRequest); ok {
				r.unary.Add(1)
				if g.GetRejectedAccessToken() != "" {
					r.reports.Add(1)
				}
			}
			return invoker(ctx, method, req, reply, cc, opts...)
		}),
		grpc.WithStreamInterceptor(func(ctx context.Context, desc *grpc.StreamDesc, cc *grpc.ClientConn, method string, streamer grpc.Streamer, opts ...grpc.CallOption) (grpc.ClientStream, error) {
			if method == pb.TokenBroker_WatchAccessToken_FullMethodName {
				r.streams.Add(1)
				if r.noWatch.Load() {
					return nil, errStreamsCut
				}
				cs, err := streamer(ctx, desc, cc, method, opts...)
				if err != nil {
					return nil, err
				}
				r.open.Add(1)
				return &countedStream{ClientStream: cs, open: &r.open}, nil
			}
			return streamer(ctx, desc, cc, method, opts...)
		}))
	must(err)
	r.cleanup = append(r.cleanup, func() { cc.Close() })
	return cc
}

// instanceHandler serves the stand-in at / and, as an on-premise virtual
// directory, at /AcumaticaERP, beside two test resources under any
// directory: .../test/redirect redirects to its "to" parameter and
// .../test/authorization answers with the request's Authorization header.
func instanceHandler(idp http.Handler) http.Handler {
	mux := http.NewServeMux()
	mux.Handle("/", idp)
	mux.Handle("/AcumaticaERP/", http.StripPrefix("/AcumaticaERP", idp))
	return http.HandlerFunc(func(w http.ResponseWriter, req *http.Request) {
		switch {
		case strings.HasSuffix(req.URL.Path, "/test/redirect"):
			http.Redirect(w, req, req.URL.Query().Get("to"), http.StatusFound)
		case strings.HasSuffix(req.URL.Path, "/test/authorization"):
			echoAuthorization(w, req)
		default:
			mux.ServeHTTP(w, req)
		}
	})
}

func echoAuthorization(w http.ResponseWriter, req *http.Request) {
	io.WriteString(w, req.Header.Get("Authorization"))
}

// countedStream counts itself out of open when it ends: the client reads
// every watch stream until it fails.
type countedStream struct {
	grpc.ClientStream
	open *atomic.Int64
	once sync.Once
}

func (s *countedStream) RecvMsg(m any) error {
	err := s.ClientStream.RecvMsg(m)
	if err != nil {
		s.once.Do(func() { s.open.Add(-1) })
	}
	return err
}

// entityURL is the stand-in's protected resource.
func (r *rig) entityURL() string { return r.idpURL + "/entity/Default/24.200.001/SalesOrder?$top=1" }

func must(err error) {
	if err != nil {
		panic(err)
	}
}

// errStreamsCut is what a cut watch stream fails with.
var errStreamsCut = status.Error(codes.Unavailable, "watch streams cut by the test")
