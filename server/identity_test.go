package server_test

import (
	"context"
	"encoding/json"
	"strings"
	"testing"

	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"

	pb "tokenbroker/gen/tokenbroker/v1"

	"tokenbroker/server"
	"tokenbroker/server/servertest"
)

// kindsPolicy has one pattern of each kind.
const kindsPolicy = `
rules:
  - identities: ["spiffe://corp.test/ops/*"]
    role: operator
    tenants: ["*"]
  - identities: ["billing.svc.corp.test"]
    role: operator
    tenants: ["globex"]
  - identities: ["cn:legacy-cn-client"]
    role: operator
    tenants: ["acme"]
`

// A subject CN never stands for a URI or DNS identity, a DNS SAN never for
// a URI or CN, and an empty last segment never fills a `*`; over real mTLS
// with real certificates. The request log says which kind matched.
func TestIdentityKindsStayApart(t *testing.T) {
	p, err := server.ParsePolicy([]byte(kindsPolicy))
	if err != nil {
		t.Fatal(err)
	}
	tf := newTLSFixture(t, 0, func(o *server.Options) { o.Authorizer = server.NewAuthorizer(p) })
	for _, tc := range []struct {
		name string
		leaf servertest.Leaf
		want codes.Code
		kind string
	}{
		{"URI SAN under ops", servertest.Leaf{URI: "spiffe://corp.test/ops/alice"}, codes.OK, "uri"},
		{"CN that spells an ops URI, no SANs", servertest.Leaf{CN: "spiffe://corp.test/ops/mallory"}, codes.Unauthenticated, "cn"},
		{"DNS SAN that spells an ops URI", servertest.Leaf{DNS: []string{"spiffe://corp.test/ops/mallory"}}, codes.Unauthenticated, "dns"},
		{"URI with an empty last segment", servertest.Leaf{URI: "spiffe://corp.test/ops/"}, codes.Unauthenticated, "uri"},
		{"DNS SAN", servertest.Leaf{DNS: []string{"billing.svc.corp.test"}}, codes.PermissionDenied, "dns"}, // globex only
		{"CN that spells a DNS name", servertest.Leaf{CN: "billing.svc.corp.test"}, codes.Unauthenticated, "cn"},
		{"CN under a cn: pattern", servertest.Leaf{CN: "legacy-cn-client"}, codes.OK, "cn"},
		{"DNS SAN that spells a CN pattern", servertest.Leaf{DNS: []string{"legacy-cn-client"}}, codes.Unauthenticated, "dns"},
		{"URI SAN that spells a CN pattern", servertest.Leaf{URI: "cn:legacy-cn-client"}, codes.Unauthenticated, "uri"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			cert := tf.ca.Issue(t, tc.leaf)
			c, _ := tf.client(t, &cert)
			_, err := c.GetConnection(context.Background(), &pb.GetConnectionRequest{Name: "tenants/acme/connections/erp"})
			if got := status.Code(err); got != tc.want {
				t.Errorf("GetConnection code = %v (%v), want %v", got, err, tc.want)
			}
			if k := loggedKind(t, tf.logs.String(), callerOf(tc.leaf)); k != tc.kind {
				t.Errorf("log says caller_kind %q, want %q", k, tc.kind)
			}
		})
	}
}

// callerOf is the identity a leaf's certificate names.
func callerOf(l servertest.Leaf) string {
	switch {
	case l.URI != "":
		return l.URI
	case len(l.DNS) > 0:
		return l.DNS[0]
	}
	return l.CN
}

// loggedKind is the caller_kind of the last request log line of caller.
func loggedKind(t *testing.T, logs, caller string) string {
	t.Helper()
	kind := "(no line)"
	for _, line := range strings.Split(logs, "\n") {
		var m map[string]any
		if json.Unmarshal([]byte(line), &m) != nil || m["caller"] != caller || m["grpc.method"] == nil {
			continue
		}
		kind, _ = m["caller_kind"].(string)
	}
	return kind
}

func TestPolicyRefusesAColonPatternOfNoKind(t *testing.T) {
	_, err := server.ParsePolicy([]byte("rules:\n  - identities: [\"urn:corp:svc:orders\"]\n    role: consumer\n    tenants: [acme]\n"))
	if err == nil || !strings.Contains(err.Error(), "uri:urn:corp:svc:orders") {
		t.Errorf("ParsePolicy = %v, want a refusal that says to prefix uri:", err)
	}
	if _, err := server.ParsePolicy([]byte("rules:\n  - identities: [\"uri:urn:corp:svc:orders\"]\n    role: consumer\n    tenants: [acme]\n")); err != nil {
		t.Errorf("explicit uri: prefix refused: %v", err)
	}
}
