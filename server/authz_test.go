package server_test

import (
	"bytes"
	"context"
	"crypto/tls"
	"crypto/x509"
	"encoding/json"
	"io"
	"log/slog"
	"net"
	"net/http"
	"net/http/httptest"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/prometheus/common/expfmt"
	"github.com/prometheus/common/model"
	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/credentials"
	healthpb "google.golang.org/grpc/health/grpc_health_v1"
	"google.golang.org/grpc/reflection/grpc_reflection_v1"
	"google.golang.org/grpc/status"

	pb "tokenbroker/gen/tokenbroker/v1"

	"tokenbroker/broker"
	"tokenbroker/broker/acumaticatest"
	"tokenbroker/server"
	"tokenbroker/server/servertest"
)

const testPolicy = `
rules:
  - identities: ["spiffe://corp.test/ops/root"]
    role: operator
    tenants: ["*"]
  - identities: ["spiffe://corp.test/ops/acme-*"]
    role: operator
    tenants: ["acme"]
  - identities: ["spiffe://corp.test/svc/orders"]
    role: consumer
    connections: ["tenants/acme/connections/erp"]
  - identities: ["billing.svc.corp.test"]
    role: consumer
    tenants: ["globex"]
  - identities: ["cn:legacy-cn-client"]
    role: consumer
    tenants: ["acme"]
`

type tlsFixture struct {
	*fixture
	addr    string
	ca      *servertest.CA
	audit   *bytes.Buffer
	auditor *server.Auditor
	metrics *server.Metrics
	hs      *httptest.Server
}

// newTLSFixture serves over mutual TLS with testPolicy; opts adjust the
// server's options.
func newTLSFixture(t *testing.T, rateLimit float64, opts ...func(*server.Options)) *tlsFixture {
	t.Helper()
	metrics := server.NewMetrics()
	f := newFixture(t, func(o *broker.Options) { o.Observer = metrics }) // plus a plaintext dev server, unused here
	tf := &tlsFixture{fixture: f, ca: servertest.NewCA(t, "test CA"), audit: &bytes.Buffer{}, metrics: metrics}
	dir := t.TempDir()
	certPath, keyPath := servertest.WritePair(t, dir, "server", tf.ca.Issue(t, servertest.Leaf{CN: "tokenbroker", IPs: []net.IP{net.ParseIP("127.0.0.1")}, Server: true}))
	caPath := filepath.Join(dir, "ca.pem")
	os.WriteFile(caPath, tf.ca.PEM, 0o600)
	files, err := server.NewTLSFiles(certPath, keyPath, caPath)
	if err != nil {
		t.Fatal(err)
	}
	p, err := server.ParsePolicy([]byte(testPolicy))
	if err != nil {
		t.Fatal(err)
	}
	tf.auditor = server.NewAuditor(tf.audit)
	tf.metrics.Watch(f.b, time.Now)
	o := server.Options{
		Broker: f.b, Logger: slog.New(slog.NewJSONHandler(f.logs, nil)), AllowUpstreamCIDRs: loopback,
		Authorizer: server.NewAuthorizer(p), Auditor: tf.auditor, Metrics: tf.metrics,
		RateLimit: rateLimit, RateBurst: int(rateLimit),
		ServerOptions: []grpc.ServerOption{grpc.Creds(files.Credentials())},
		Admin:         f.store,
	}
	for _, opt := range opts {
		opt(&o)
	}
	srv := server.New(o)
	// The benchmarks' baselines, added beside TokenBroker.
	servertest.RegisterNoop(srv.Server)
	servertest.RegisterEcho(srv.Server, &pb.GetAccessTokenResponse{})
	lis, _ := net.Listen("tcp", "127.0.0.1:0")
	go srv.Serve(lis)
	t.Cleanup(srv.Stop)
	tf.addr = lis.Addr().String()
	tf.hs = httptest.NewServer(tf.metrics.Handler())
	t.Cleanup(tf.hs.Close)
	// Seed connections through the broker directly.
	for _, n := range []string{"tenants/acme/connections/erp", "tenants/acme/connections/other", "tenants/globex/connections/erp"} {
		c := f.connection()
		if _, err := f.b.CreateConnection(context.Background(), &broker.Connection{
			Name: n, InstanceURL: c.GetInstanceUrl(), ClientID: c.GetClientId(), ClientSecret: c.GetClientSecret(),
			Username: c.GetUsername(), Password: c.GetPassword(),
		}, false); err != nil {
			t.Fatal(err)
		}
	}
	return tf
}

// client dials with an optional client certificate.
func (tf *tlsFixture) client(t *testing.T, cert *tls.Certificate) (pb.TokenBrokerClient, *grpc.ClientConn) {
	t.Helper()
	pool := x509.NewCertPool()
	pool.AddCert(tf.ca.Cert)
	cfg := &tls.Config{RootCAs: pool, MinVersion: tls.VersionTLS12}
	if cert != nil {
		// Present the certificate whatever CAs the server asks for, so the
		// server, not the client, decides.
		c := *cert
		cfg.GetClientCertificate = func(*tls.CertificateRequestInfo) (*tls.Certificate, error) { return &c, nil }
	}
	cc, err := grpc.NewClient(tf.addr, grpc.WithTransportCredentials(credentials.NewTLS(cfg)))
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { cc.Close() })
	return pb.NewTokenBrokerClient(cc), cc
}

func TestAuthorizationMatrix(t *testing.T) {
	tf := newTLSFixture(t, 0)
	ca := tf.ca
	ids := map[string]tls.Certificate{
		"root":    ca.Issue(t, servertest.Leaf{URI: "spiffe://corp.test/ops/root"}),
		"acmeops": ca.Issue(t, servertest.Leaf{URI: "spiffe://corp.test/ops/acme-team"}),
		"orders":  ca.Issue(t, servertest.Leaf{URI: "spiffe://corp.test/svc/orders"}),
		"billing": ca.Issue(t, servertest.Leaf{DNS: []string{"billing.svc.corp.test"}}),
		"legacy":  ca.Issue(t, servertest.Leaf{CN: "legacy-cn-client"}),
		"unknown": ca.Issue(t, servertest.Leaf{URI: "spiffe://corp.test/svc/stranger"}),
	}
	const (
		acmeErp   = "tenants/acme/connections/erp"
		acmeOther = "tenants/acme/connections/other"
		globexErp = "tenants/globex/connections/erp"
		acmeGhost = "tenants/acme/connections/ghost"
		initGhost = "tenants/initech/connections/ghost"
	)
	type call struct {
		name string
		do   func(c pb.TokenBrokerClient) error
	}
	ctx := context.Background()
	get := func(n string) call {
		return call{"Get " + n, func(c pb.TokenBrokerClient) error {
			_, err := c.GetConnection(ctx, &pb.GetConnectionRequest{Name: n})
			return err
		}}
	}
	token := func(n string) call {
		return call{"Token " + n, func(c pb.TokenBrokerClient) error {
			_, err := c.GetAccessToken(ctx, &pb.GetAccessTokenRequest{Name: n})
			return err
		}}
	}
	test := func(n string) call {
		return call{"Test " + n, func(c pb.TokenBrokerClient) error {
			_, err := c.TestConnection(ctx, &pb.TestConnectionRequest{Name: n})
			return err
		}}
	}
	del := func(n string) call {
		return call{"Delete " + n, func(c pb.TokenBrokerClient) error {
			_, err := c.DeleteConnection(ctx, &pb.DeleteConnectionRequest{Name: n})
			return err
		}}
	}
	list := func(parent string) call {
		return call{"List " + parent, func(c pb.TokenBrokerClient) error {
			_, err := c.ListConnections(ctx, &pb.ListConnectionsRequest{Parent: parent})
			return err
		}}
	}
	create := func(parent string) call {
		return call{"Create " + parent, func(c pb.TokenBrokerClient) error {
			_, err := c.CreateConnection(ctx, &pb.CreateConnectionRequest{Parent: parent, ConnectionId: "new", Connection: &pb.Connection{InstanceUrl: "ftp://bad"}})
			return err
		}}
	}
	OK, PD, NF, UA, IA := codes.OK, codes.PermissionDenied, codes.NotFound, codes.Unauthenticated, codes.InvalidArgument
	for _, tc := range []struct {
		who  string
		call call
		want codes.Code
	}{
		{"root", get(acmeErp), OK},
		{"root", get(initGhost), NF},
		{"root", list("tenants/-"), OK},
		{"root", create("tenants/initech"), IA}, // allowed, then validated
		{"root", token(acmeErp), PD},            // operators do not get tokens
		{"acmeops", get(acmeErp), OK},
		{"acmeops", get(acmeGhost), NF},
		{"acmeops", get(globexErp), PD},
		{"acmeops", get(initGhost), PD}, // permission before existence
		{"acmeops", list("tenants/acme"), OK},
		{"acmeops", list("tenants/globex"), PD},
		{"acmeops", create("tenants/globex"), PD},
		{"acmeops", test(acmeErp), OK},
		{"acmeops", del(globexErp), PD},
		{"orders", token(acmeErp), OK},
		{"orders", token(acmeOther), PD},
		{"orders", token(globexErp), PD},
		{"orders", test(acmeErp), OK},
		{"orders", get(acmeErp), PD},
		{"orders", list("tenants/-"), PD},
		{"orders", del(acmeErp), PD},
		{"billing", token(globexErp), OK},
		{"billing", token(acmeErp), PD},
		{"billing", token("tenants/globex/connections/ghost"), NF},
		{"legacy", token(acmeOther), OK},
		{"legacy", token(globexErp), PD},
		{"unknown", token(acmeErp), UA},
		{"unknown", get(acmeErp), UA},
		{"none", token(acmeErp), UA},
		{"none", list("tenants/-"), UA},
	} {
		t.Run(tc.who+" "+tc.call.name, func(t *testing.T) {
			var cert *tls.Certificate
			if c, ok := ids[tc.who]; ok {
				cert = &c
			}
			c, _ := tf.client(t, cert)
			err := tc.call.do(c)
			if got := status.Code(err); got != tc.want {
				t.Errorf("code = %v (%v), want %v", got, err, tc.want)
			}
		})
	}
	// Listing all tenants shows only what the caller may manage.
	root := ids["acmeops"]
	c, _ := tf.client(t, &root)
	resp, err := c.ListConnections(ctx, &pb.ListConnectionsRequest{Parent: "tenants/-"})
	if err != nil {
		t.Fatal(err)
	}
	for _, conn := range resp.GetConnections() {
		if !strings.HasPrefix(conn.GetName(), "tenants/acme/") {
			t.Errorf("acme operator sees %s", conn.GetName())
		}
	}
	if len(resp.GetConnections()) != 2 {
		t.Errorf("acme operator sees %d connections, want 2", len(resp.GetConnections()))
	}
}

func TestTLSRejectsBadCertificatesAndKeepsHealthOpen(t *testing.T) {
	tf := newTLSFixture(t, 0)
	other := servertest.NewCA(t, "other CA")
	for _, tc := range []struct {
		name string
		cert tls.Certificate
	}{
		{"expired", tf.ca.Issue(t, servertest.Leaf{URI: "spiffe://corp.test/ops/root", NotAfter: time.Now().Add(-time.Minute)})},
		{"other CA", other.Issue(t, servertest.Leaf{URI: "spiffe://corp.test/ops/root"})},
	} {
		t.Run(tc.name, func(t *testing.T) {
			c, _ := tf.client(t, &tc.cert)
			ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
			defer cancel()
			_, err := c.GetConnection(ctx, &pb.GetConnectionRequest{Name: "tenants/acme/connections/erp"})
			if code := status.Code(err); code != codes.Unavailable {
				t.Errorf("code = %v (%v), want the handshake refused (UNAVAILABLE)", code, err)
			}
		})
	}
	// Health needs no client certificate.
	_, cc := tf.client(t, nil)
	resp, err := healthpb.NewHealthClient(cc).Check(context.Background(), &healthpb.HealthCheckRequest{})
	if err != nil || resp.GetStatus() != healthpb.HealthCheckResponse_SERVING {
		t.Errorf("health without certificate: %v %v", resp, err)
	}
	// Reflection is for operators only.
	for who, want := range map[string]codes.Code{"spiffe://corp.test/ops/root": codes.OK, "spiffe://corp.test/svc/orders": codes.PermissionDenied} {
		cert := tf.ca.Issue(t, servertest.Leaf{URI: who})
		_, cc := tf.client(t, &cert)
		stream, err := grpc_reflection_v1.NewServerReflectionClient(cc).ServerReflectionInfo(context.Background())
		if err == nil {
			stream.Send(&grpc_reflection_v1.ServerReflectionRequest{MessageRequest: &grpc_reflection_v1.ServerReflectionRequest_ListServices{}})
			_, err = stream.Recv()
		}
		if status.Code(err) != want {
			t.Errorf("reflection for %s: %v, want %v", who, err, want)
		}
	}
}

func TestAuditAndMetrics(t *testing.T) {
	tf := newTLSFixture(t, 0)
	orders := tf.ca.Issue(t, servertest.Leaf{URI: "spiffe://corp.test/svc/orders"})
	c, _ := tf.client(t, &orders)
	tok, err := c.GetAccessToken(context.Background(), &pb.GetAccessTokenRequest{Name: "tenants/acme/connections/erp"})
	if err != nil {
		t.Fatal(err)
	}
	c.GetAccessToken(context.Background(), &pb.GetAccessTokenRequest{Name: "tenants/globex/connections/erp"}) // denied
	tf.auditor.Close()
	var lines []map[string]any
	for _, l := range strings.Split(strings.TrimSpace(tf.audit.String()), "\n") {
		var m map[string]any
		if err := json.Unmarshal([]byte(l), &m); err != nil {
			t.Fatalf("audit line %q: %v", l, err)
		}
		lines = append(lines, m)
	}
	if len(lines) != 2 {
		t.Fatalf("audit lines = %d, want 2:\n%s", len(lines), tf.audit.String())
	}
	if lines[0]["caller"] != "spiffe://corp.test/svc/orders" || lines[0]["outcome"] != "OK" ||
		lines[0]["token_fingerprint"] != server.Fingerprint(tok.GetAccessToken()) || lines[0]["connection"] != "tenants/acme/connections/erp" {
		t.Errorf("audit line = %v", lines[0])
	}
	if lines[1]["outcome"] != "PermissionDenied" || lines[1]["token_fingerprint"] != nil {
		t.Errorf("denied audit line = %v", lines[1])
	}
	if strings.Contains(tf.audit.String(), tok.GetAccessToken()) {
		t.Error("audit log holds the token")
	}
	// Metrics, parsed with the Prometheus text parser.
	resp, err := http.Get(tf.hs.URL)
	if err != nil {
		t.Fatal(err)
	}
	body, _ := io.ReadAll(resp.Body)
	resp.Body.Close()
	parser := expfmt.NewTextParser(model.UTF8Validation)
	families, err := parser.TextToMetricFamilies(bytes.NewReader(body))
	if err != nil {
		t.Fatalf("parse metrics: %v", err)
	}
	value := func(name string, labels map[string]string) float64 {
		mf, ok := families[name]
		if !ok {
			t.Fatalf("metric %s missing", name)
		}
		for _, m := range mf.GetMetric() {
			match := true
			for k, v := range labels {
				found := false
				for _, lp := range m.GetLabel() {
					found = found || (lp.GetName() == k && lp.GetValue() == v)
				}
				match = match && found
			}
			if match {
				if m.GetCounter() != nil {
					return m.GetCounter().GetValue()
				}
				if m.GetGauge() != nil {
					return m.GetGauge().GetValue()
				}
				return float64(m.GetHistogram().GetSampleCount())
			}
		}
		t.Fatalf("metric %s%v missing", name, labels)
		return 0
	}
	if v := value("tokenbroker_connections", map[string]string{"state": "ACTIVE"}); v != 3 {
		t.Errorf("active connections = %v, want 3", v)
	}
	if v := value("tokenbroker_token_cache_hits_total", nil); v != 1 {
		t.Errorf("cache hits = %v, want 1", v)
	}
	if v := value("tokenbroker_upstream_token_requests_total", map[string]string{"grant": "password", "outcome": "ok"}); v != 3 {
		t.Errorf("password grants = %v, want 3", v)
	}
	if v := value("tokenbroker_upstream_token_request_seconds", map[string]string{"grant": "password"}); v != 3 {
		t.Errorf("latency samples = %v, want 3", v)
	}
	if v := value("grpc_server_handled_total", map[string]string{"grpc_method": "GetAccessToken", "grpc_code": "PermissionDenied"}); v != 1 {
		t.Errorf("denied calls = %v, want 1", v)
	}
}

func TestSecretExpiryMetric(t *testing.T) {
	tf := newTLSFixture(t, 0)
	root := tf.ca.Issue(t, servertest.Leaf{URI: "spiffe://corp.test/ops/root"})
	c, _ := tf.client(t, &root)
	_ = c
	exp := time.Now().Add(10 * 24 * time.Hour)
	v, err := tf.b.UpdateConnection(context.Background(), "tenants/acme/connections/erp", &broker.Connection{ClientSecretExpireTime: exp}, []string{"client_secret_expire_time"}, "", false)
	if err != nil {
		t.Fatal(err)
	}
	if len(v.Status.Warnings) != 1 || !strings.Contains(v.Status.Warnings[0], "expires") {
		t.Errorf("warnings = %v", v.Status.Warnings)
	}
	resp, _ := http.Get(tf.hs.URL)
	body, _ := io.ReadAll(resp.Body)
	resp.Body.Close()
	parser := expfmt.NewTextParser(model.UTF8Validation)
	families, err := parser.TextToMetricFamilies(bytes.NewReader(body))
	if err != nil {
		t.Fatal(err)
	}
	mf := families["tokenbroker_client_secret_expiry_seconds"]
	if mf == nil || len(mf.GetMetric()) != 1 {
		t.Fatalf("expiry metric = %v", mf)
	}
	if got := mf.GetMetric()[0].GetGauge().GetValue(); got < 9*24*3600 || got > 10*24*3600 {
		t.Errorf("seconds until expiry = %v", got)
	}
}

func TestPerCallerRateLimit(t *testing.T) {
	tf := newTLSFixture(t, 5)
	orders := tf.ca.Issue(t, servertest.Leaf{URI: "spiffe://corp.test/svc/orders"})
	billing := tf.ca.Issue(t, servertest.Leaf{DNS: []string{"billing.svc.corp.test"}})
	c, _ := tf.client(t, &orders)
	exhausted := 0
	for range 20 {
		_, err := c.GetAccessToken(context.Background(), &pb.GetAccessTokenRequest{Name: "tenants/acme/connections/erp"})
		if status.Code(err) == codes.ResourceExhausted {
			exhausted++
		}
	}
	if exhausted < 10 {
		t.Errorf("rate limited %d of 20 calls at 5/s burst 5, want at least 10", exhausted)
	}
	// Another caller has its own bucket.
	c2, _ := tf.client(t, &billing)
	if _, err := c2.GetAccessToken(context.Background(), &pb.GetAccessTokenRequest{Name: "tenants/globex/connections/erp"}); err != nil {
		t.Errorf("other caller limited: %v", err)
	}
}

func TestPolicyErrorsPointAtTheLine(t *testing.T) {
	for _, tc := range []struct {
		name, policy, want string
	}{
		{"unknown role", "rules:\n  - identities: [a]\n    role: admin\n    tenants: ['*']\n", "line 2"},
		{"unknown key", "rules:\n  - identities: [a]\n    role: operator\n    tenant: ['*']\n", "line 4"},
		{"bad glob", "rules:\n  - identities: ['[']\n    role: operator\n    tenants: ['*']\n", "line 2"},
		{"bad tenant", "rules:\n  - identities: [a]\n    role: operator\n    tenants: [ACME]\n", "line 2"},
		{"consumer without grants", "rules:\n  - identities: [a]\n    role: consumer\n", "line 2"},
		{"json", `{"rules": [{"identities": ["a"], "role": "nope", "tenants": ["*"]}]}`, "line 1"},
		{"not yaml", "rules: [\n", "line"},
		{"top-level typo", "rulez: []\n", "line 1"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			_, err := server.ParsePolicy([]byte(tc.policy))
			if err == nil || !strings.Contains(err.Error(), tc.want) {
				t.Errorf("err = %v, want it to point at %q", err, tc.want)
			}
		})
	}
	if _, err := server.ParsePolicy([]byte(testPolicy)); err != nil {
		t.Errorf("valid policy: %v", err)
	}
}

var (
	_ = broker.AllTenants
	_ = acumaticatest.Options{}
)

// A method added beside TokenBroker is denied to every caller under a
// policy, even one whose request the caller could send to TokenBroker,
// unless it is named in AuthenticatedMethods: then any caller the policy
// knows may call it, and no one else. Naming it opens nothing else.
func TestAuthenticatedMethodsNeedOnlyAKnownCaller(t *testing.T) {
	tf := newTLSFixture(t, 0, func(o *server.Options) { o.AuthenticatedMethods = []string{servertest.NoopMethod} })
	orders := tf.ca.Issue(t, servertest.Leaf{URI: "spiffe://corp.test/svc/orders"})
	stranger := tf.ca.Issue(t, servertest.Leaf{URI: "spiffe://corp.test/svc/stranger"})
	ctx := context.Background()
	for _, c := range []struct {
		who  string
		cert *tls.Certificate
		call func(*grpc.ClientConn) error
		want codes.Code
	}{
		{"known caller, named method", &orders, func(cc *grpc.ClientConn) error { return servertest.CallNoop(ctx, cc) }, codes.OK},
		{"unknown caller, named method", &stranger, func(cc *grpc.ClientConn) error { return servertest.CallNoop(ctx, cc) }, codes.Unauthenticated},
		{"no certificate, named method", nil, func(cc *grpc.ClientConn) error { return servertest.CallNoop(ctx, cc) }, codes.Unauthenticated},
		{"known caller, method not named", &orders, func(cc *grpc.ClientConn) error {
			// orders consumes this connection: through GetAccessToken it is allowed.
			return servertest.CallEcho(ctx, cc, &pb.GetAccessTokenRequest{Name: "tenants/acme/connections/erp"})
		}, codes.PermissionDenied},
		{"known caller, the same request through TokenBroker", &orders, func(cc *grpc.ClientConn) error {
			_, err := pb.NewTokenBrokerClient(cc).GetAccessToken(ctx, &pb.GetAccessTokenRequest{Name: "tenants/acme/connections/erp"})
			return err
		}, codes.OK},
		{"known caller, TokenBroker still by the policy", &orders, func(cc *grpc.ClientConn) error {
			_, err := pb.NewTokenBrokerClient(cc).GetAccessToken(ctx, &pb.GetAccessTokenRequest{Name: "tenants/globex/connections/erp"})
			return err
		}, codes.PermissionDenied},
	} {
		_, cc := tf.client(t, c.cert)
		if got := status.Code(c.call(cc)); got != c.want {
			t.Errorf("%s: %v, want %v", c.who, got, c.want)
		}
	}
}
