package main

import (
	"context"
	"crypto/tls"
	"crypto/x509"
	"io"
	"net"
	"net/http"
	"os"
	"path/filepath"
	"regexp"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/credentials"
	"google.golang.org/grpc/status"

	pb "tokenbroker/gen/tokenbroker/v1"

	"tokenbroker/broker/acumaticatest"
	"tokenbroker/server/servertest"
	"tokenbroker/storage"
	"tokenbroker/storage/bolt"
)

// waitOutput waits until the process has printed want.
func (p *proc) waitOutput(want string, within time.Duration) bool {
	deadline := time.Now().Add(within)
	for time.Now().Before(deadline) {
		if strings.Contains(p.out.String(), want) {
			return true
		}
		select {
		case <-p.exited:
			return strings.Contains(p.out.String(), want)
		case <-time.After(20 * time.Millisecond):
		}
	}
	return false
}

func TestSIGTERMDuringSlowRefreshFinishesTheCommit(t *testing.T) {
	s, url := idp(t)
	dir := filepath.Join(t.TempDir(), "data")
	p := start(t, nil, "--data-dir", dir, "--listen", "127.0.0.1:0")
	c := p.client()
	ctx := context.Background()
	createConnection(t, c, "tenants/acme", url)
	t1, _ := c.GetAccessToken(ctx, &pb.GetAccessTokenRequest{Name: connName})
	arrived := make(chan struct{}, 1)
	s.Inject(acumaticatest.Fault{Arrived: arrived, Delay: 500 * time.Millisecond, Mutate: func(map[string]any) {}})
	got := make(chan *pb.GetAccessTokenResponse, 1)
	go func() {
		r, _ := c.GetAccessToken(ctx, &pb.GetAccessTokenRequest{Name: connName, RejectedAccessToken: t1.GetAccessToken()})
		got <- r
	}()
	<-arrived
	p.cmd.Process.Signal(syscall.SIGTERM)
	<-p.exited
	if p.err != nil {
		t.Fatalf("exit: %v\n%s", p.err, p.out.String())
	}
	// The in-flight caller got the new token, and it was committed first.
	r := <-got
	if r.GetAccessToken() == "" || r.GetAccessToken() == t1.GetAccessToken() {
		t.Fatalf("in-flight caller got %v", r)
	}
	keys, err := storage.LoadKeyFile(filepath.Join(dir, "tokenbroker.key"))
	if err != nil {
		t.Fatal(err)
	}
	st, err := bolt.Open(filepath.Join(dir, "tokenbroker.db"), bolt.Options{Keyring: keys})
	if err != nil {
		t.Fatal(err)
	}
	tok, err := st.GetTokens(ctx, connName)
	st.Close()
	if err != nil || tok.AccessToken != r.GetAccessToken() || tok.IntentGrant != "" || tok.Generation != 2 {
		t.Errorf("stored after SIGTERM: gen %d, intent %q, matches %v (%v)", tok.Generation, tok.IntentGrant, tok.AccessToken == r.GetAccessToken(), err)
	}
	if c := s.Counts(); c.RefreshGrants != 1 || c.InvalidGrant != 0 {
		t.Errorf("counts = %+v", c)
	}
}

func TestMTLSPolicyAndReload(t *testing.T) {
	s, url := idp(t)
	_ = s
	dir := t.TempDir()
	ca := servertest.NewCA(t, "test CA")
	certPath, keyPath := servertest.WritePair(t, dir, "server", ca.Issue(t, servertest.Leaf{CN: "tokenbroker", IPs: []net.IP{net.ParseIP("127.0.0.1")}, Server: true}))
	caPath := filepath.Join(dir, "ca.pem")
	os.WriteFile(caPath, ca.PEM, 0o600)
	policy := filepath.Join(dir, "policy.yaml")
	os.WriteFile(policy, []byte(`rules:
  - identities: ["spiffe://corp.test/ops/root"]
    role: operator
    tenants: ["*"]
  - identities: ["spiffe://corp.test/svc/orders"]
    role: consumer
    connections: ["tenants/acme/connections/erp"]
`), 0o600)
	p := start(t, nil, "--data-dir", filepath.Join(dir, "data"), "--listen", "127.0.0.1:0",
		"--tls-cert", certPath, "--tls-key", keyPath, "--client-ca", caPath, "--policy", policy,
		"--reload-interval", "50ms", "--allow-insecure-upstream")
	if p.addr == "" {
		t.Fatalf("did not start: %s", p.out.String())
	}
	dial := func(uri string) pb.TokenBrokerClient {
		pool := x509.NewCertPool()
		pool.AddCert(ca.Cert)
		cfg := &tls.Config{RootCAs: pool, MinVersion: tls.VersionTLS12}
		if uri != "" {
			cfg.Certificates = []tls.Certificate{ca.Issue(t, servertest.Leaf{URI: uri})}
		}
		cc, err := grpc.NewClient(p.addr, grpc.WithTransportCredentials(credentials.NewTLS(cfg)))
		if err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { cc.Close() })
		return pb.NewTokenBrokerClient(cc)
	}
	ctx := context.Background()
	root, orders := dial("spiffe://corp.test/ops/root"), dial("spiffe://corp.test/svc/orders")
	createConnection(t, root, "tenants/acme", url)
	if _, err := orders.GetAccessToken(ctx, &pb.GetAccessTokenRequest{Name: connName}); err != nil {
		t.Fatalf("consumer: %v", err)
	}
	if _, err := dial("").GetAccessToken(ctx, &pb.GetAccessTokenRequest{Name: connName}); status.Code(err) != codes.Unauthenticated {
		t.Errorf("no certificate: %v", err)
	}
	// A broken policy file keeps the old policy.
	os.WriteFile(policy, []byte("rules:\n  - identities: [x]\n    role: superuser\n"), 0o600)
	if !p.waitOutput("keeping the old policy", 10*time.Second) {
		t.Fatalf("bad policy not reported: %s", p.out.String())
	}
	if _, err := orders.GetAccessToken(ctx, &pb.GetAccessTokenRequest{Name: connName}); err != nil {
		t.Errorf("after bad policy: %v", err)
	}
	// A valid new policy takes effect without a restart.
	os.WriteFile(policy, []byte(`rules:
  - identities: ["spiffe://corp.test/ops/root"]
    role: operator
    tenants: ["*"]
`), 0o600)
	if !p.waitOutput("reloaded policy", 10*time.Second) {
		t.Fatalf("policy not reloaded: %s", p.out.String())
	}
	if _, err := orders.GetAccessToken(ctx, &pb.GetAccessTokenRequest{Name: connName}); status.Code(err) != codes.Unauthenticated {
		t.Errorf("consumer removed from policy: %v, want UNAUTHENTICATED", err)
	}
}

func TestTLSStartRules(t *testing.T) {
	dir := t.TempDir()
	for _, tc := range []struct {
		args []string
		want string
	}{
		{[]string{"--tls-cert", "a.crt", "--tls-key", "a.key"}, "--tls-cert needs --policy"},
		{[]string{"--policy", "p.yaml"}, "--policy needs --client-ca"},
		{[]string{"--tls-cert", "a.crt"}, "go together"},
		{[]string{"--max-concurrent-upstream", "0"}, "--max-concurrent-upstream must be at least 1"},
		{[]string{"--max-concurrent-upstream-per-host", "0"}, "--max-concurrent-upstream-per-host must be at least 1"},
		{[]string{"--etcd-endpoints", "http://127.0.0.1:1"}, "every replica must seal with the same key"},
	} {
		p := start(t, nil, append([]string{"--data-dir", filepath.Join(dir, "data"), "--listen", "127.0.0.1:0"}, tc.args...)...)
		<-p.exited
		if p.err == nil || !strings.Contains(p.out.String(), tc.want) {
			t.Errorf("%v: %v %q, want %q", tc.args, p.err, p.out.String(), tc.want)
		}
	}
}

// An admin call the caller saw succeed is in the audit log even if the
// process is killed right after; token hand-outs may wait for the next
// second's flush.
func TestAdminCallsAreAuditedBeforeTheyAnswer(t *testing.T) {
	_, url := idp(t)
	dir := t.TempDir()
	auditPath := filepath.Join(dir, "audit.log")
	p := start(t, nil, "--data-dir", filepath.Join(dir, "data"), "--listen", "127.0.0.1:0", "--audit-log", auditPath)
	c := p.client()
	ctx := context.Background()
	createConnection(t, c, "tenants/acme", url)
	if _, err := c.GetAccessToken(ctx, &pb.GetAccessTokenRequest{Name: connName}); err != nil {
		t.Fatal(err)
	}
	got, err := c.GetConnection(ctx, &pb.GetConnectionRequest{Name: connName})
	if err != nil {
		t.Fatal(err)
	}
	if _, err := c.DeleteConnection(ctx, &pb.DeleteConnectionRequest{Name: connName, Etag: got.GetConnection().GetEtag()}); err != nil {
		t.Fatal(err)
	}
	p.kill9()
	audit, err := os.ReadFile(auditPath)
	if err != nil {
		t.Fatal(err)
	}
	for _, method := range []string{"CreateConnection", "GetConnection", "DeleteConnection"} {
		if !strings.Contains(string(audit), `"method":"/tokenbroker.v1.TokenBroker/`+method+`","connection":"`+connName+`","outcome":"OK"`) {
			t.Errorf("no audit line for %s after kill -9; the log holds:\n%s", method, audit)
		}
	}
}

// TestMetricsShowTheHeapFloor scrapes the binary's /metrics: GOGC is raised
// for the heap floor by default, and left at 100 with the floor off.
func TestMetricsShowTheHeapFloor(t *testing.T) {
	listenLine := regexp.MustCompile(`"msg":"metrics serving","listen":"([^"]+)"`)
	gogcLine := regexp.MustCompile(`(?m)^go_gc_gogc_percent (\S+)$`)
	for _, tc := range []struct {
		args []string
		want func(float64) bool
		says string
	}{
		{nil, func(p float64) bool { return p > 100 }, "above 100 (the default 64 MiB floor over a heap of a few MiB)"},
		{[]string{"--gc-heap-floor-mib", "0"}, func(p float64) bool { return p == 100 }, "100 (floor off)"},
	} {
		args := append([]string{"--listen", "127.0.0.1:0", "--metrics-listen", "127.0.0.1:0", "--data-dir", filepath.Join(t.TempDir(), "data")}, tc.args...)
		p := start(t, nil, args...)
		if !p.waitOutput("loaded 0 connections", 20*time.Second) {
			t.Fatalf("did not load: %s", p.out.String())
		}
		m := listenLine.FindStringSubmatch(p.out.String())
		if m == nil {
			t.Fatalf("no metrics address in %s", p.out.String())
		}
		resp, err := http.Get("http://" + m[1] + "/metrics")
		if err != nil {
			t.Fatal(err)
		}
		body, err := io.ReadAll(resp.Body)
		resp.Body.Close()
		if err != nil {
			t.Fatal(err)
		}
		g := gogcLine.FindSubmatch(body)
		if g == nil {
			t.Fatalf("no go_gc_gogc_percent in /metrics")
		}
		percent, err := strconv.ParseFloat(string(g[1]), 64)
		if err != nil || !tc.want(percent) {
			t.Errorf("%v: go_gc_gogc_percent %s, want %s", tc.args, g[1], tc.says)
		}
		p.cmd.Process.Signal(syscall.SIGTERM)
		<-p.exited
	}
}
