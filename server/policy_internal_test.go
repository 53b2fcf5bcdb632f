package server

import (
	"context"
	"crypto/tls"
	"crypto/x509"
	"fmt"
	"net"
	"strings"
	"testing"

	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials"
	"google.golang.org/grpc/peer"

	pb "tokenbroker/gen/tokenbroker/v1"

	"tokenbroker/server/servertest"
)

// policyOfSize is a policy of n consumer rules, one service each, with the
// benchmarked caller's rule last.
func policyOfSize(tb testing.TB, n int) *Policy {
	var b strings.Builder
	b.WriteString("rules:\n  - identities: [\"spiffe://corp.example/ops/*\"]\n    role: operator\n    tenants: [\"*\"]\n")
	for i := range n - 1 {
		fmt.Fprintf(&b, "  - identities: [\"spiffe://corp.example/svc/s%d\"]\n    role: consumer\n    connections: [\"tenants/t%d/connections/*\"]\n", i, i)
	}
	b.WriteString("  - identities: [\"spiffe://corp.example/svc/orders\"]\n    role: consumer\n    connections: [\"tenants/acme/connections/erp\"]\n")
	p, err := ParsePolicy([]byte(b.String()))
	if err != nil {
		tb.Fatal(err)
	}
	return p
}

// BenchmarkAuthorizeToken is the authorization of one GetAccessToken (the
// caller's identity from its connection, then the policy) with policies of
// growing size, and dev mode (no policy, no check) as the baseline. The
// identity-per-call case formats the identity from the certificate on each
// call, as a connection not made through TLSFiles.Credentials does:
// go test -run '^$' -bench AuthorizeToken ./server/
func BenchmarkAuthorizeToken(b *testing.B) {
	ca := servertest.NewCA(b, "bench CA")
	leaf := ca.Issue(b, servertest.Leaf{URI: "spiffe://corp.example/svc/orders"})
	cert, _ := x509.ParseCertificate(leaf.Certificate[0])
	tlsInfo := credentials.TLSInfo{State: tls.ConnectionState{VerifiedChains: [][]*x509.Certificate{{cert, ca.Cert}}}}
	addr := &net.TCPAddr{IP: net.IPv4(127, 0, 0, 1), Port: 50000}
	onConn := peer.NewContext(context.Background(), &peer.Peer{Addr: addr, AuthInfo: callerInfo{TLSInfo: tlsInfo, identity: tlsIdentity(tlsInfo)}})
	perCall := peer.NewContext(context.Background(), &peer.Peer{Addr: addr, AuthInfo: tlsInfo})
	req := &pb.GetAccessTokenRequest{Name: "tenants/acme/connections/erp"}
	info := &grpc.UnaryServerInfo{FullMethod: pb.TokenBroker_GetAccessToken_FullMethodName}
	handler := func(context.Context, any) (any, error) { return nil, nil }
	for _, c := range []struct {
		name  string
		rules int
		ctx   context.Context
	}{
		{"dev-mode", 0, onConn},
		{"rules-1", 1, onConn}, {"rules-10", 10, onConn}, {"rules-100", 100, onConn}, {"rules-1000", 1000, onConn},
		{"rules-1-identity-per-call", 1, perCall},
	} {
		a := NewAuthorizer(nil)
		if c.rules > 0 {
			a = NewAuthorizer(policyOfSize(b, c.rules))
		}
		b.Run(c.name, func(b *testing.B) {
			b.ReportAllocs()
			for b.Loop() {
				if _, err := a.unary(c.ctx, req, info, handler); err != nil {
					b.Fatal(err)
				}
			}
		})
	}
}

// The index answers as a scan of every rule's patterns would, for exact
// identities, globs, escaped and bracketed patterns, an identity named by
// both kinds of rule and one named twice in a rule, and identities whose
// value a pattern of another kind spells.
func TestPolicyIndexAgreesWithAScanOfEveryRule(t *testing.T) {
	p, err := ParsePolicy([]byte(`rules:
  - identities: ["spiffe://c/ops/*", "spiffe://c/svc/a"]
    role: operator
    tenants: ["acme"]
  - identities: ["spiffe://c/svc/a", "spiffe://c/svc/a"]
    role: consumer
    connections: ["tenants/globex/connections/*"]
  - identities: ["spiffe://c/svc/[bc]", "spiffe://c/svc/d\\*"]
    role: consumer
    tenants: ["*"]
  - identities: ["spiffe://c/ops/root", "cn-only"]
    role: operator
    tenants: ["*"]
  - identities: ["spiffe://c/svc/?"]
    role: consumer
    tenants: ["initech"]
`))
	if err != nil {
		t.Fatal(err)
	}
	scan := func(identity string, f func(*rule) bool) bool {
		for i := range p.rules {
			if globAny(p.rules[i].identities, identity) && f(&p.rules[i]) {
				return true
			}
		}
		return false
	}
	identities := []string{"uri:spiffe://c/ops/root", "uri:spiffe://c/ops/x", "uri:spiffe://c/ops/x/y", "uri:spiffe://c/svc/a", "uri:spiffe://c/svc/b",
		"uri:spiffe://c/svc/c", "uri:spiffe://c/svc/e", "uri:spiffe://c/svc/d*", "uri:spiffe://c/svc/dx", "dns:cn-only", "dns:cn", "", "uri:spiffe://c/svc/[bc]",
		"uri:spiffe://c/ops/", "cn:cn-only", "cn:spiffe://c/ops/root", "dns:spiffe://c/ops/x", "spiffe://c/ops/root"}
	tenants := []string{"acme", "globex", "initech", "other"}
	var known int
	for _, id := range identities {
		if got, want := p.Known(id), scan(id, func(*rule) bool { return true }); got != want {
			t.Errorf("Known(%q) = %v, scan says %v", id, got, want)
		} else if got {
			known++
		}
		if got, want := p.IsOperator(id), scan(id, func(r *rule) bool { return r.role == RoleOperator }); got != want {
			t.Errorf("IsOperator(%q) = %v, scan says %v", id, got, want)
		}
		for _, tenant := range tenants {
			name := "tenants/" + tenant + "/connections/erp"
			manage := func(r *rule) bool { return r.manages(tenant) }
			consume := func(r *rule) bool { return r.consumes(tenant, name) }
			if got, want := p.CanManage(id, tenant), scan(id, manage); got != want {
				t.Errorf("CanManage(%q, %q) = %v, scan says %v", id, tenant, got, want)
			}
			if got, want := p.CanConsume(id, name), scan(id, consume); got != want {
				t.Errorf("CanConsume(%q, %q) = %v, scan says %v", id, name, got, want)
			}
		}
	}
	// Kinds stay apart: a CN or DNS SAN that spells a URI the policy names
	// is a stranger, and so is a URI whose last segment is empty.
	for _, id := range []string{"cn:spiffe://c/ops/root", "dns:spiffe://c/ops/x", "uri:spiffe://c/ops/", "spiffe://c/ops/root"} {
		if p.Known(id) {
			t.Errorf("Known(%q) = true", id)
		}
	}
	// Not a vacuous comparison: most identities are known, some are not.
	if known < 8 || known == len(identities) {
		t.Errorf("%d of %d identities known; the table does not exercise both answers", known, len(identities))
	}
}
