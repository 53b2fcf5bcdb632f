package server_test

import (
	"context"
	"crypto/tls"
	"net/http"
	"net/url"
	"slices"
	"testing"

	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"
	"google.golang.org/protobuf/types/known/fieldmaskpb"

	pb "tokenbroker/gen/tokenbroker/v1"

	"tokenbroker/server/servertest"
)

const (
	acClientID = "5B3F0E3A-8D4C-4E1B-9A0F-2C6D7E8F9A1B@MyTenant"
	acRedirect = "http://127.0.0.1:8765/callback"
)

func (f *fixture) acConnection() *pb.Connection {
	return &pb.Connection{InstanceUrl: f.idpURL, ClientId: acClientID, ClientSecret: clientSecret,
		Flow: pb.Connection_FLOW_AUTHORIZATION_CODE, RedirectUri: acRedirect}
}

// redirectOf follows an authorization URL as curl without -L does.
func redirectOf(t *testing.T, authURL string) url.Values {
	t.Helper()
	hc := &http.Client{CheckRedirect: func(*http.Request, []*http.Request) error { return http.ErrUseLastResponse }}
	resp, err := hc.Get(authURL)
	if err != nil {
		t.Fatal(err)
	}
	resp.Body.Close()
	loc, err := url.Parse(resp.Header.Get("Location"))
	if err != nil || resp.StatusCode != http.StatusFound {
		t.Fatalf("authorize: %d %v", resp.StatusCode, err)
	}
	return loc.Query()
}

func TestAuthorizationCodeOverGRPC(t *testing.T) {
	f := newFixture(t)
	f.idp.AddAuthCodeClient(acClientID, clientSecret, acRedirect)
	f.idp.SetConsentUser(username)
	ctx := context.Background()
	const name = "tenants/acme/connections/destination"

	dry, err := f.client.StartAuthorization(ctx, &pb.StartAuthorizationRequest{Parent: "tenants/acme", ConnectionId: "destination", Connection: f.acConnection(), ValidateOnly: true})
	if err != nil || dry.GetAuthorizationUrl() != "" || dry.GetConnection().GetFlow() != pb.Connection_FLOW_AUTHORIZATION_CODE {
		t.Fatalf("validate_only: %v %v", dry, err)
	}
	start, err := f.client.StartAuthorization(ctx, &pb.StartAuthorizationRequest{Parent: "tenants/acme", ConnectionId: "destination", Connection: f.acConnection()})
	if err != nil {
		t.Fatal(err)
	}
	q := redirectOf(t, start.GetAuthorizationUrl())
	done, err := f.client.CompleteAuthorization(ctx, &pb.CompleteAuthorizationRequest{Name: name, State: q.Get("state"), Code: q.Get("code")})
	if err != nil {
		t.Fatal(err)
	}
	c := done.GetConnection()
	if c.GetName() != name || c.GetFlow() != pb.Connection_FLOW_AUTHORIZATION_CODE || c.GetRedirectUri() != acRedirect ||
		c.GetPasswordSet() || c.GetUsername() != "" || !c.GetClientSecretSet() || c.GetState() != pb.Connection_STATE_ACTIVE {
		t.Fatalf("completed connection %v", c)
	}
	if _, err := f.client.GetAccessToken(ctx, &pb.GetAccessTokenRequest{Name: name}); err != nil {
		t.Fatal(err)
	}
	// The state is used up: a second completion is refused with its reason.
	_, err = f.client.CompleteAuthorization(ctx, &pb.CompleteAuthorizationRequest{Name: name, State: q.Get("state"), Code: q.Get("code")})
	if status.Code(err) != codes.FailedPrecondition || errorInfo(err).GetReason() != "AUTHORIZATION_STATE_INVALID" {
		t.Fatalf("reused state: %v", err)
	}
	// A password connection reads as FLOW_PASSWORD.
	if pc := f.create("acme", "erp"); pc.GetFlow() != pb.Connection_FLOW_PASSWORD || pc.GetRedirectUri() != "" {
		t.Fatalf("password connection %v", pc)
	}

	withPassword := f.acConnection()
	withPassword.Password = "not-the-password"
	for _, tc := range []struct {
		name string
		call func() error
		want string
	}{
		{"password on an authorization-code connection", func() error {
			_, err := f.client.CreateConnection(ctx, &pb.CreateConnectionRequest{Parent: "tenants/acme", ConnectionId: "x", Connection: withPassword})
			return err
		}, "connection.password"},
		{"both name and parent", func() error {
			_, err := f.client.StartAuthorization(ctx, &pb.StartAuthorizationRequest{Name: name, Parent: "tenants/acme", ConnectionId: "x"})
			return err
		}, "name"},
		{"update_mask with a new connection", func() error {
			_, err := f.client.ImportRefreshToken(ctx, &pb.ImportRefreshTokenRequest{Parent: "tenants/acme", ConnectionId: "x",
				Connection: f.acConnection(), RefreshToken: "rt", UpdateMask: &fieldmaskpb.FieldMask{Paths: []string{"client_secret"}}})
			return err
		}, "update_mask"},
		{"no code", func() error {
			_, err := f.client.CompleteAuthorization(ctx, &pb.CompleteAuthorizationRequest{Name: name, State: "s"})
			return err
		}, "code"},
		{"no refresh token", func() error {
			_, err := f.client.ImportRefreshToken(ctx, &pb.ImportRefreshTokenRequest{Name: name})
			return err
		}, "refresh_token"},
		{"client_secret change without a proof", func() error {
			_, err := f.client.UpdateConnection(ctx, &pb.UpdateConnectionRequest{Connection: &pb.Connection{Name: name, ClientSecret: "new-secret-value"},
				UpdateMask: &fieldmaskpb.FieldMask{Paths: []string{"client_secret"}}})
			return err
		}, "update_mask"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			err := tc.call()
			if status.Code(err) != codes.InvalidArgument || !slices.Contains(violationFields(err), tc.want) {
				t.Fatalf("err = %v (fields %v), want INVALID_ARGUMENT on %s", err, violationFields(err), tc.want)
			}
		})
	}
}

// TestAuthorizationCodeRPCsAreOperatorCalls: starting, completing and
// importing need the operator role on the connection's tenant; permission
// is checked before anything else.
func TestAuthorizationCodeRPCsAreOperatorCalls(t *testing.T) {
	tf := newTLSFixture(t, 0)
	ids := map[string]tls.Certificate{
		"root":    tf.ca.Issue(t, servertest.Leaf{URI: "spiffe://corp.test/ops/root"}),
		"acmeops": tf.ca.Issue(t, servertest.Leaf{URI: "spiffe://corp.test/ops/acme-team"}),
		"orders":  tf.ca.Issue(t, servertest.Leaf{URI: "spiffe://corp.test/svc/orders"}),
	}
	ctx := context.Background()
	start := func(parent string) func(pb.TokenBrokerClient) error {
		return func(c pb.TokenBrokerClient) error {
			_, err := c.StartAuthorization(ctx, &pb.StartAuthorizationRequest{Parent: parent, ConnectionId: "dest", Connection: tf.acConnection(), ValidateOnly: true})
			return err
		}
	}
	complete := func(name string) func(pb.TokenBrokerClient) error {
		return func(c pb.TokenBrokerClient) error {
			_, err := c.CompleteAuthorization(ctx, &pb.CompleteAuthorizationRequest{Name: name, State: "made-up", Code: "made-up"})
			return err
		}
	}
	imp := func(name string) func(pb.TokenBrokerClient) error {
		return func(c pb.TokenBrokerClient) error {
			_, err := c.ImportRefreshToken(ctx, &pb.ImportRefreshTokenRequest{Name: name, RefreshToken: "rt", ValidateOnly: true})
			return err
		}
	}
	OK, PD, FP := codes.OK, codes.PermissionDenied, codes.FailedPrecondition
	for _, tc := range []struct {
		who, what string
		call      func(pb.TokenBrokerClient) error
		want      codes.Code
	}{
		{"root", "start globex", start("tenants/globex"), OK},
		{"acmeops", "start acme", start("tenants/acme"), OK},
		{"acmeops", "start globex", start("tenants/globex"), PD},
		{"acmeops", "complete acme", complete("tenants/acme/connections/erp"), FP},
		{"acmeops", "complete globex", complete("tenants/globex/connections/erp"), PD},
		{"acmeops", "import acme", imp("tenants/acme/connections/erp"), OK},
		{"acmeops", "import globex", imp("tenants/globex/connections/erp"), PD},
		{"orders", "start acme", start("tenants/acme"), PD},
		{"orders", "complete its own connection", complete("tenants/acme/connections/erp"), PD},
		{"orders", "import into its own connection", imp("tenants/acme/connections/erp"), PD},
	} {
		t.Run(tc.who+" "+tc.what, func(t *testing.T) {
			cert := ids[tc.who]
			c, _ := tf.client(t, &cert)
			if err := tc.call(c); status.Code(err) != tc.want {
				t.Fatalf("code = %v (%v), want %v", status.Code(err), err, tc.want)
			}
		})
	}
}
