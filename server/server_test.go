package server_test

import (
	"bytes"
	"context"
	"encoding/json"
	"fmt"
	"io"
	"log/slog"
	"net"
	"net/http/httptest"
	"net/netip"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"

	"google.golang.org/genproto/googleapis/rpc/errdetails"
	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/credentials/insecure"
	healthpb "google.golang.org/grpc/health/grpc_health_v1"
	"google.golang.org/grpc/status"
	"google.golang.org/protobuf/encoding/prototext"
	"google.golang.org/protobuf/proto"
	"google.golang.org/protobuf/types/known/durationpb"
	"google.golang.org/protobuf/types/known/fieldmaskpb"

	pb "tokenbroker/gen/tokenbroker/v1"

	"tokenbroker/broker"
	"tokenbroker/broker/acumaticatest"
	"tokenbroker/internal/testkit"
	"tokenbroker/server"
	"tokenbroker/storage"
	"tokenbroker/storage/bolt"
)

const (
	clientID     = "88358B02-A48D-A50E-F710-39C1636C30F6@MyTenant"
	clientSecret = "SRV-client-secret-4b1d7e0c9a"
	username     = "integration"
	password     = "SRV-user-password-77c2e9f1"
)

// loopback allows the stand-ins' addresses, and no more: http beyond
// loopback stays refused.
var loopback = []netip.Prefix{netip.MustParsePrefix("127.0.0.0/8"), netip.MustParsePrefix("::1/128")}

type fixture struct {
	t      *testing.T
	idp    *acumaticatest.Server
	idpURL string
	store  *bolt.Store
	b      *broker.Broker
	client pb.TokenBrokerClient
	conn   *grpc.ClientConn
	logs   *testkit.LockedBuffer
	seen   []string // every response and error text, for leak scans
	mu     sync.Mutex
}

func newFixture(t *testing.T, opts ...func(*broker.Options)) *fixture {
	t.Helper()
	f := &fixture{t: t, logs: &testkit.LockedBuffer{}}
	log := slog.New(slog.NewJSONHandler(f.logs, &slog.HandlerOptions{Level: slog.LevelDebug}))
	f.idp = acumaticatest.New(acumaticatest.Options{})
	f.idp.AddClient(clientID, clientSecret)
	f.idp.AddUser(username, password)
	hs := httptest.NewServer(f.idp.Handler())
	t.Cleanup(hs.Close)
	f.idpURL = hs.URL
	keys, _ := storage.NewKeyring(bytes.Repeat([]byte{7}, 32))
	st, err := bolt.Open(filepath.Join(t.TempDir(), "tokenbroker.db"), bolt.Options{Keyring: keys})
	if err != nil {
		t.Fatal(err)
	}
	f.store = st
	bo := broker.Options{Store: st, Logger: log, TickInterval: -1, AllowUpstreamCIDRs: loopback, BackoffBase: time.Millisecond, BackoffMax: 5 * time.Millisecond, MaxAttempts: 1}
	for _, o := range opts {
		o(&bo)
	}
	b, err := broker.New(bo)
	if err != nil {
		t.Fatal(err)
	}
	f.b = b
	srv := server.New(server.Options{Broker: b, Logger: log, AllowUpstreamCIDRs: loopback})
	f.start(srv.Server)
	t.Cleanup(func() {
		srv.Stop()
		b.Close()
		st.Close()
		f.checkNoLeaks()
	})
	return f
}

func (f *fixture) start(gs *grpc.Server) {
	lis, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		f.t.Fatal(err)
	}
	go gs.Serve(lis)
	cc, err := grpc.NewClient(lis.Addr().String(), grpc.WithTransportCredentials(insecure.NewCredentials()),
		grpc.WithUnaryInterceptor(f.record))
	if err != nil {
		f.t.Fatal(err)
	}
	f.t.Cleanup(func() { cc.Close() })
	f.conn = cc
	f.client = pb.NewTokenBrokerClient(cc)
}

// record keeps every response and error the client sees.
func (f *fixture) record(ctx context.Context, method string, req, reply any, cc *grpc.ClientConn, invoker grpc.UnaryInvoker, opts ...grpc.CallOption) error {
	err := invoker(ctx, method, req, reply, cc, opts...)
	f.mu.Lock()
	defer f.mu.Unlock()
	if err != nil {
		st, _ := status.FromError(err)
		f.seen = append(f.seen, prototext.Format(st.Proto()))
	} else if m, ok := reply.(proto.Message); ok && method != "/tokenbroker.v1.TokenBroker/GetAccessToken" {
		if r, ok := m.(*pb.StartAuthorizationResponse); ok {
			// The state belongs in the authorization URL, and only there.
			m = &pb.StartAuthorizationResponse{ExpireTime: r.GetExpireTime(), Connection: r.GetConnection()}
		}
		f.seen = append(f.seen, prototext.Format(m))
	}
	return err
}

// checkNoLeaks scans every log line, error and read response for secrets
// and every token the identity server issued.
func (f *fixture) checkNoLeaks() {
	secrets := append([]string{clientSecret, password, "not-the-password", "new-secret-value"}, f.idp.Issued()...)
	f.mu.Lock()
	texts := append([]string{f.logs.String()}, f.seen...)
	f.mu.Unlock()
	for _, text := range texts {
		for _, s := range secrets {
			if strings.Contains(text, s) {
				f.t.Errorf("secret %.6s... leaked into: %.200s", s, text)
			}
		}
	}
}

func (f *fixture) connection() *pb.Connection {
	return &pb.Connection{
		DisplayName: "Acme ERP", InstanceUrl: f.idpURL, ClientId: clientID,
		ClientSecret: clientSecret, Username: username, Password: password,
	}
}

func (f *fixture) create(tenant, id string) *pb.Connection {
	f.t.Helper()
	resp, err := f.client.CreateConnection(context.Background(), &pb.CreateConnectionRequest{
		Parent: "tenants/" + tenant, ConnectionId: id, Connection: f.connection(),
	})
	if err != nil {
		f.t.Fatalf("CreateConnection: %v", err)
	}
	return resp.GetConnection()
}

func errorInfo(err error) *errdetails.ErrorInfo {
	st, _ := status.FromError(err)
	for _, d := range st.Details() {
		if ei, ok := d.(*errdetails.ErrorInfo); ok {
			return ei
		}
	}
	return nil
}

func violationFields(err error) []string {
	st, _ := status.FromError(err)
	var out []string
	for _, d := range st.Details() {
		if br, ok := d.(*errdetails.BadRequest); ok {
			for _, v := range br.GetFieldViolations() {
				out = append(out, v.GetField())
			}
		}
	}
	return out
}

func TestConnectionLifecycle(t *testing.T) {
	f := newFixture(t)
	ctx := context.Background()
	c := f.create("acme", "erp")
	if c.GetName() != "tenants/acme/connections/erp" || c.GetState() != pb.Connection_STATE_ACTIVE ||
		!c.GetClientSecretSet() || !c.GetPasswordSet() || c.GetClientSecret() != "" || c.GetPassword() != "" ||
		!c.GetStatus().GetHasRefreshToken() || c.GetEtag() == "" {
		t.Errorf("created = %v", c)
	}
	if got := f.idp.Counts().PasswordGrants; got != 1 {
		t.Errorf("password grants = %d, want 1", got)
	}
	got, err := f.client.GetConnection(ctx, &pb.GetConnectionRequest{Name: c.GetName()})
	if err != nil || got.GetConnection().GetEtag() != c.GetEtag() {
		t.Fatalf("get: %v", err)
	}
	tok, err := f.client.GetAccessToken(ctx, &pb.GetAccessTokenRequest{Name: c.GetName()})
	if err != nil {
		t.Fatal(err)
	}
	if !f.idp.AccessTokenValid(tok.GetAccessToken()) || tok.GetTokenType() != "Bearer" || tok.GetInstanceUrl() != f.idpURL ||
		time.Until(tok.GetExpireTime().AsTime()) < 59*time.Minute {
		t.Errorf("token response = %v", tok.GetExpireTime())
	}
	// Update with mask and etag; a stale etag is ABORTED.
	upd, err := f.client.UpdateConnection(ctx, &pb.UpdateConnectionRequest{
		Connection: &pb.Connection{Name: c.GetName(), DisplayName: "Renamed", Etag: c.GetEtag()},
		UpdateMask: &fieldmaskpb.FieldMask{Paths: []string{"display_name"}},
	})
	if err != nil || upd.GetConnection().GetDisplayName() != "Renamed" || upd.GetConnection().GetEtag() == c.GetEtag() {
		t.Fatalf("update: %v %v", upd, err)
	}
	_, err = f.client.UpdateConnection(ctx, &pb.UpdateConnectionRequest{
		Connection: &pb.Connection{Name: c.GetName(), DisplayName: "Again", Etag: c.GetEtag()},
		UpdateMask: &fieldmaskpb.FieldMask{Paths: []string{"display_name"}},
	})
	if status.Code(err) != codes.Aborted {
		t.Errorf("stale etag: %v, want ABORTED", err)
	}
	// Rotating the secret: a wrong value is FAILED_PRECONDITION and changes nothing.
	_, err = f.client.UpdateConnection(ctx, &pb.UpdateConnectionRequest{
		Connection: &pb.Connection{Name: c.GetName(), ClientSecret: "new-secret-value"},
		UpdateMask: &fieldmaskpb.FieldMask{Paths: []string{"client_secret"}},
	})
	if status.Code(err) != codes.FailedPrecondition || errorInfo(err).GetReason() != broker.ReasonClientRejected {
		t.Errorf("wrong new secret: %v", err)
	}
	f.idp.AddClient(clientID, "new-secret-value")
	if _, err := f.client.UpdateConnection(ctx, &pb.UpdateConnectionRequest{
		Connection: &pb.Connection{Name: c.GetName(), ClientSecret: "new-secret-value"},
		UpdateMask: &fieldmaskpb.FieldMask{Paths: []string{"client_secret"}},
	}); err != nil {
		t.Fatalf("secret rotation: %v", err)
	}
	// Test: one entity readable, one forbidden, one unknown.
	tr, err := f.client.TestConnection(ctx, &pb.TestConnectionRequest{Name: c.GetName(), Entities: []string{"SalesOrder", "Customer", "Widget"}})
	if err != nil {
		t.Fatal(err)
	}
	var outcomes []pb.TestConnectionResponse_EntityResult_Outcome
	for _, e := range tr.GetEntities() {
		outcomes = append(outcomes, e.GetOutcome())
	}
	want := []pb.TestConnectionResponse_EntityResult_Outcome{
		pb.TestConnectionResponse_EntityResult_OUTCOME_OK,
		pb.TestConnectionResponse_EntityResult_OUTCOME_FORBIDDEN,
		pb.TestConnectionResponse_EntityResult_OUTCOME_NOT_FOUND,
	}
	if fmt.Sprint(outcomes) != fmt.Sprint(want) {
		t.Errorf("test outcomes = %v, want %v", outcomes, want)
	}
	before := f.idp.Counts()
	if _, err := f.client.DeleteConnection(ctx, &pb.DeleteConnectionRequest{Name: c.GetName()}); err != nil {
		t.Fatal(err)
	}
	_, err = f.client.GetConnection(ctx, &pb.GetConnectionRequest{Name: c.GetName()})
	if status.Code(err) != codes.NotFound || errorInfo(err).GetMetadata()["connection"] != c.GetName() {
		t.Errorf("after delete: %v, want NOT_FOUND with ErrorInfo", err)
	}
	if c := f.idp.Counts(); c.Revocations-before.Revocations != 1 || c.Logouts-before.Logouts != 1 || c.OpenSessions != 0 {
		t.Errorf("delete: %+v -> %+v, want one revocation, one logout, no open session", before, c)
	}
}

func TestListPagination(t *testing.T) {
	f := newFixture(t)
	ctx := context.Background()
	var want []string
	for _, tenant := range []string{"acme", "globex"} {
		for i := range 3 {
			c := f.create(tenant, fmt.Sprintf("c%d", i))
			want = append(want, c.GetName())
		}
	}
	var got []string
	token := ""
	pages := 0
	for {
		resp, err := f.client.ListConnections(ctx, &pb.ListConnectionsRequest{Parent: "tenants/-", PageSize: 4, PageToken: token})
		if err != nil {
			t.Fatal(err)
		}
		pages++
		for _, c := range resp.GetConnections() {
			got = append(got, c.GetName())
			if c.GetClientSecret() != "" || c.GetPassword() != "" {
				t.Error("list returned a secret")
			}
		}
		if token = resp.GetNextPageToken(); token == "" {
			break
		}
	}
	if fmt.Sprint(got) != fmt.Sprint(want) || pages != 2 {
		t.Errorf("all tenants: got %v in %d pages, want %v in 2", got, pages, want)
	}
	resp, err := f.client.ListConnections(ctx, &pb.ListConnectionsRequest{Parent: "tenants/globex"})
	if err != nil || len(resp.GetConnections()) != 3 || resp.GetNextPageToken() != "" {
		t.Errorf("one tenant: %v %v", resp, err)
	}
	// A page token is bound to its parent.
	first, _ := f.client.ListConnections(ctx, &pb.ListConnectionsRequest{Parent: "tenants/-", PageSize: 1})
	_, err = f.client.ListConnections(ctx, &pb.ListConnectionsRequest{Parent: "tenants/acme", PageToken: first.GetNextPageToken()})
	if status.Code(err) != codes.InvalidArgument {
		t.Errorf("page token of another parent: %v", err)
	}
}

func TestInputRules(t *testing.T) {
	f := newFixture(t)
	ctx := context.Background()
	existing := f.create("acme", "erp")
	base := func(mut func(*pb.Connection)) *pb.CreateConnectionRequest {
		c := f.connection()
		mut(c)
		return &pb.CreateConnectionRequest{Parent: "tenants/acme", ConnectionId: "new", Connection: c}
	}
	long := strings.Repeat("x", 1025)
	for _, tc := range []struct {
		name  string
		call  func() error
		field string
	}{
		{"bad parent", func() error {
			r := base(func(*pb.Connection) {})
			r.Parent = "acme"
			_, err := f.client.CreateConnection(ctx, r)
			return err
		}, "parent"},
		{"bad connection id", func() error {
			r := base(func(*pb.Connection) {})
			r.ConnectionId = "Bad_ID"
			_, err := f.client.CreateConnection(ctx, r)
			return err
		}, "connection_id"},
		{"ftp instance", func() error {
			_, err := f.client.CreateConnection(ctx, base(func(c *pb.Connection) { c.InstanceUrl = "ftp://erp.example.com" }))
			return err
		}, "connection.instance_url"},
		{"http beyond loopback", func() error {
			_, err := f.client.CreateConnection(ctx, base(func(c *pb.Connection) { c.InstanceUrl = "http://erp.example.com" }))
			return err
		}, "connection.instance_url"},
		{"query", func() error {
			_, err := f.client.CreateConnection(ctx, base(func(c *pb.Connection) { c.InstanceUrl = "https://erp.example.com/?a=b" }))
			return err
		}, "connection.instance_url"},
		{"fragment", func() error {
			_, err := f.client.CreateConnection(ctx, base(func(c *pb.Connection) { c.InstanceUrl = "https://erp.example.com/#x" }))
			return err
		}, "connection.instance_url"},
		{"user info", func() error {
			_, err := f.client.CreateConnection(ctx, base(func(c *pb.Connection) { c.InstanceUrl = "https://u:p@erp.example.com" }))
			return err
		}, "connection.instance_url"},
		{"not a url", func() error {
			_, err := f.client.CreateConnection(ctx, base(func(c *pb.Connection) { c.InstanceUrl = "not a url" }))
			return err
		}, "connection.instance_url"},
		{"bare guid", func() error {
			_, err := f.client.CreateConnection(ctx, base(func(c *pb.Connection) { c.ClientId = "88358B02-A48D-A50E-F710-39C1636C30F6" }))
			return err
		}, "connection.client_id"},
		{"missing secret", func() error {
			_, err := f.client.CreateConnection(ctx, base(func(c *pb.Connection) { c.ClientSecret = "" }))
			return err
		}, "connection.client_secret"},
		{"long password", func() error {
			_, err := f.client.CreateConnection(ctx, base(func(c *pb.Connection) { c.Password = long }))
			return err
		}, "connection.password"},
		{"missing username", func() error {
			_, err := f.client.CreateConnection(ctx, base(func(c *pb.Connection) { c.Username = "" }))
			return err
		}, "connection.username"},
		{"bad name", func() error {
			_, err := f.client.GetConnection(ctx, &pb.GetConnectionRequest{Name: "connections/erp"})
			return err
		}, "name"},
		{"negative page size", func() error {
			_, err := f.client.ListConnections(ctx, &pb.ListConnectionsRequest{Parent: "tenants/acme", PageSize: -1})
			return err
		}, "page_size"},
		{"garbage page token", func() error {
			_, err := f.client.ListConnections(ctx, &pb.ListConnectionsRequest{Parent: "tenants/acme", PageToken: "%%%"})
			return err
		}, "page_token"},
		{"unknown mask path", func() error {
			_, err := f.client.UpdateConnection(ctx, &pb.UpdateConnectionRequest{Connection: &pb.Connection{Name: existing.GetName()}, UpdateMask: &fieldmaskpb.FieldMask{Paths: []string{"colour"}}})
			return err
		}, "update_mask"},
		{"output-only mask path", func() error {
			_, err := f.client.UpdateConnection(ctx, &pb.UpdateConnectionRequest{Connection: &pb.Connection{Name: existing.GetName()}, UpdateMask: &fieldmaskpb.FieldMask{Paths: []string{"state"}}})
			return err
		}, "update_mask"},
		{"empty mask", func() error {
			_, err := f.client.UpdateConnection(ctx, &pb.UpdateConnectionRequest{Connection: &pb.Connection{Name: existing.GetName(), DisplayName: "x"}})
			return err
		}, "update_mask"},
		{"update to bare guid", func() error {
			_, err := f.client.UpdateConnection(ctx, &pb.UpdateConnectionRequest{Connection: &pb.Connection{Name: existing.GetName(), ClientId: "88358B02-A48D-A50E-F710-39C1636C30F6"}, UpdateMask: &fieldmaskpb.FieldMask{Paths: []string{"client_id"}}})
			return err
		}, "connection.client_id"},
		{"min_valid_for too long", func() error {
			_, err := f.client.GetAccessToken(ctx, &pb.GetAccessTokenRequest{Name: existing.GetName(), MinValidFor: durationpb.New(2 * time.Hour)})
			return err
		}, "min_valid_for"},
		{"negative min_valid_for", func() error {
			_, err := f.client.GetAccessToken(ctx, &pb.GetAccessTokenRequest{Name: existing.GetName(), MinValidFor: durationpb.New(-time.Second)})
			return err
		}, "min_valid_for"},
		{"bad entity", func() error {
			_, err := f.client.TestConnection(ctx, &pb.TestConnectionRequest{Name: existing.GetName(), Entities: []string{"../x"}})
			return err
		}, "entities[0]"},
		{"bad endpoint", func() error {
			_, err := f.client.TestConnection(ctx, &pb.TestConnectionRequest{Name: existing.GetName(), Endpoint: "Default"})
			return err
		}, "endpoint"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			before := f.idp.Counts()
			err := tc.call()
			if status.Code(err) != codes.InvalidArgument {
				t.Fatalf("code = %v (%v), want INVALID_ARGUMENT", status.Code(err), err)
			}
			fields := violationFields(err)
			found := false
			for _, fl := range fields {
				found = found || fl == tc.field
			}
			if !found {
				t.Errorf("violations %v do not name %q", fields, tc.field)
			}
			if errorInfo(err).GetReason() != broker.ReasonInvalidArgument {
				t.Errorf("ErrorInfo = %v", errorInfo(err))
			}
			if after := f.idp.Counts(); after != before {
				t.Errorf("invalid request reached upstream: %+v -> %+v", before, after)
			}
		})
	}
	// Nothing stored changed.
	list, err := f.client.ListConnections(ctx, &pb.ListConnectionsRequest{Parent: "tenants/-"})
	if err != nil || len(list.GetConnections()) != 1 || list.GetConnections()[0].GetEtag() != existing.GetEtag() {
		t.Errorf("store changed by invalid requests: %v %v", list, err)
	}
}

func TestInstanceURLNormalized(t *testing.T) {
	for _, tc := range []struct{ in, want string }{
		{"mycompany.acumatica.com", "https://mycompany.acumatica.com"},
		{"https://mycompany.acumatica.com", "https://mycompany.acumatica.com"},
		{"https://mycompany.acumatica.com/", "https://mycompany.acumatica.com"},
		{"https://erp.example.com/AcumaticaERP/", "https://erp.example.com/AcumaticaERP"},
		{"HTTPS://ERP.Example.com:8443/AcumaticaERP", "https://erp.example.com:8443/AcumaticaERP"},
		{"http://127.0.0.1:8081", "http://127.0.0.1:8081"},
		{"http://localhost:8081/", "http://localhost:8081"},
	} {
		got, err := broker.NormalizeInstanceURL(tc.in, false)
		if err != nil || got != tc.want {
			t.Errorf("NormalizeInstanceURL(%q) = %q, %v; want %q", tc.in, got, err, tc.want)
		}
	}
}

func TestValidateOnlyStoresNothingAndCallsNoUpstream(t *testing.T) {
	f := newFixture(t)
	resp, err := f.client.CreateConnection(context.Background(), &pb.CreateConnectionRequest{
		Parent: "tenants/acme", ConnectionId: "erp", Connection: f.connection(), ValidateOnly: true,
	})
	if err != nil || resp.GetConnection().GetName() != "tenants/acme/connections/erp" {
		t.Fatalf("validate_only: %v %v", resp, err)
	}
	if c := f.idp.Counts(); c.PasswordGrants != 0 {
		t.Errorf("validate_only called upstream: %+v", c)
	}
	_, err = f.client.GetConnection(context.Background(), &pb.GetConnectionRequest{Name: "tenants/acme/connections/erp"})
	if status.Code(err) != codes.NotFound {
		t.Errorf("validate_only stored the connection: %v", err)
	}
}

func TestRejectedCredentialsFailedPrecondition(t *testing.T) {
	f := newFixture(t)
	c := f.connection()
	c.Password = "not-the-password"
	_, err := f.client.CreateConnection(context.Background(), &pb.CreateConnectionRequest{Parent: "tenants/acme", ConnectionId: "erp", Connection: c})
	if status.Code(err) != codes.FailedPrecondition || errorInfo(err).GetReason() != broker.ReasonCredentialsRejected {
		t.Fatalf("err = %v, want FAILED_PRECONDITION CREDENTIALS_REJECTED", err)
	}
	list, _ := f.client.ListConnections(context.Background(), &pb.ListConnectionsRequest{Parent: "tenants/-"})
	if len(list.GetConnections()) != 0 {
		t.Error("rejected connection stored")
	}
	// Duplicate create is ALREADY_EXISTS without an upstream call.
	f.create("acme", "erp")
	before := f.idp.Counts()
	_, err = f.client.CreateConnection(context.Background(), &pb.CreateConnectionRequest{Parent: "tenants/acme", ConnectionId: "erp", Connection: f.connection()})
	if status.Code(err) != codes.AlreadyExists || f.idp.Counts() != before {
		t.Errorf("duplicate: %v", err)
	}
}

func TestUnavailableCarriesRetryInfo(t *testing.T) {
	f := newFixture(t)
	c := f.create("acme", "erp")
	// The refresh token dies and upstream is down: no valid token to serve.
	f.idp.Inject(acumaticatest.Fault{Status: 503, RetryAfter: "30"})
	_, err := f.client.GetAccessToken(context.Background(), &pb.GetAccessTokenRequest{Name: c.GetName(), MinValidFor: durationpb.New(30 * time.Minute)})
	// The cached token has ~60 min left, so the broker serves it.
	if err != nil {
		t.Fatalf("cached token not served during outage: %v", err)
	}
	tok, _ := f.client.GetAccessToken(context.Background(), &pb.GetAccessTokenRequest{Name: c.GetName()})
	f.idp.Inject(acumaticatest.Fault{Status: 503, RetryAfter: "30"})
	_, err = f.client.GetAccessToken(context.Background(), &pb.GetAccessTokenRequest{Name: c.GetName(), RejectedAccessToken: tok.GetAccessToken()})
	st, _ := status.FromError(err)
	var retry *errdetails.RetryInfo
	for _, d := range st.Details() {
		if r, ok := d.(*errdetails.RetryInfo); ok {
			retry = r
		}
	}
	if st.Code() != codes.Unavailable || retry == nil || retry.GetRetryDelay().AsDuration() < 30*time.Second {
		t.Fatalf("err = %v, want UNAVAILABLE with RetryInfo >= 30s", err)
	}
	if errorInfo(err).GetReason() != broker.ReasonUpstreamUnavailable || errorInfo(err).GetMetadata()["connection"] != c.GetName() {
		t.Errorf("ErrorInfo = %v", errorInfo(err))
	}
	got, _ := f.client.GetConnection(context.Background(), &pb.GetConnectionRequest{Name: c.GetName()})
	if got.GetConnection().GetState() != pb.Connection_STATE_DEGRADED || got.GetConnection().GetStatus().GetLastError().GetCode() != broker.ReasonUpstreamUnavailable {
		t.Errorf("state = %v", got.GetConnection().GetState())
	}
}

func TestPanicBecomesInternal(t *testing.T) {
	f := newFixture(t)
	// A server over a nil broker panics in every handler.
	srv := server.New(server.Options{Broker: nil, Logger: slog.New(slog.NewJSONHandler(f.logs, nil))})
	t.Cleanup(srv.Stop)
	f.start(srv.Server)
	_, err := f.client.GetConnection(context.Background(), &pb.GetConnectionRequest{Name: "tenants/a/connections/b"})
	st, _ := status.FromError(err)
	if st.Code() != codes.Internal || st.Message() != "internal error" {
		t.Fatalf("err = %v, want INTERNAL internal error", err)
	}
	// The server keeps serving.
	_, err = f.client.GetConnection(context.Background(), &pb.GetConnectionRequest{Name: "tenants/a/connections/b"})
	if status.Code(err) != codes.Internal {
		t.Errorf("second call: %v", err)
	}
	if !strings.Contains(f.logs.String(), "panic recovered") {
		t.Error("panic not logged")
	}
}

func TestHealthAndReflection(t *testing.T) {
	f := newFixture(t)
	resp, err := healthpb.NewHealthClient(f.conn).Check(context.Background(), &healthpb.HealthCheckRequest{Service: "tokenbroker.v1.TokenBroker"})
	if err != nil || resp.GetStatus() != healthpb.HealthCheckResponse_SERVING {
		t.Errorf("health: %v %v", resp, err)
	}
}

func TestRequestsAreLoggedWithoutPayloads(t *testing.T) {
	f := newFixture(t)
	c := f.create("acme", "erp")
	if _, err := f.client.GetAccessToken(context.Background(), &pb.GetAccessTokenRequest{Name: c.GetName()}); err != nil {
		t.Fatal(err)
	}
	logs := f.logs.String()
	for _, want := range []string{`"grpc.method":"CreateConnection"`, `"grpc.method":"GetAccessToken"`, `"finished call"`, `"grpc.code":"OK"`} {
		if !strings.Contains(logs, want) {
			t.Errorf("logs lack %q", want)
		}
	}
	// checkNoLeaks (cleanup) scans these logs for every secret and token.
}

// TestSuccessfulTokenCallsLogAtDebug: the hot path's successes go to debug
// (the audit log records each token issued); its failures and every admin
// call stay at info or above.
func TestSuccessfulTokenCallsLogAtDebug(t *testing.T) {
	f := newFixture(t)
	c := f.create("acme", "erp")
	if _, err := f.client.GetAccessToken(context.Background(), &pb.GetAccessTokenRequest{Name: c.GetName()}); err != nil {
		t.Fatal(err)
	}
	if _, err := f.client.GetAccessToken(context.Background(), &pb.GetAccessTokenRequest{Name: "tenants/acme/connections/nope"}); status.Code(err) != codes.NotFound {
		t.Fatalf("unknown connection: %v, want NOT_FOUND", err)
	}
	levels := map[string]string{} // method and code -> level of its "finished call" line
	for _, line := range strings.Split(strings.TrimSpace(f.logs.String()), "\n") {
		var rec struct {
			Level  string `json:"level"`
			Msg    string `json:"msg"`
			Method string `json:"grpc.method"`
			Code   string `json:"grpc.code"`
		}
		if err := json.Unmarshal([]byte(line), &rec); err != nil {
			t.Fatalf("log line %q: %v", line, err)
		}
		if rec.Msg == "finished call" {
			levels[rec.Method+" "+rec.Code] = rec.Level
		}
	}
	for call, want := range map[string]string{
		"GetAccessToken OK":       "DEBUG",
		"GetAccessToken NotFound": "INFO",
		"CreateConnection OK":     "INFO",
	} {
		if got := levels[call]; got != want {
			t.Errorf("%s logged at %q, want %s (all: %v)", call, got, want, levels)
		}
	}
}

// With debug lines off, a successful GetAccessToken writes no request line,
// while a failed one writes the same "finished call" line as with debug on,
// timed from the call's real start: the quiet path logs it after the fact.
func TestQuietFailuresAreLoggedWithTheirRealDuration(t *testing.T) {
	f := newFixture(t)
	c := f.create("acme", "erp")
	var infoLogs testkit.LockedBuffer
	infoLog := slog.New(slog.NewJSONHandler(io.MultiWriter(&infoLogs, f.logs), &slog.HandlerOptions{Level: slog.LevelInfo}))
	srv := server.New(server.Options{Broker: f.b, Logger: infoLog, AllowUpstreamCIDRs: loopback})
	t.Cleanup(srv.Stop)
	f.start(srv.Server) // f.client now calls the info-level server

	tok, err := f.client.GetAccessToken(context.Background(), &pb.GetAccessTokenRequest{Name: c.GetName()})
	if err != nil {
		t.Fatal(err)
	}
	const delay = 150 * time.Millisecond
	f.idp.Inject(acumaticatest.Fault{Status: 503, Delay: delay})
	before := time.Now()
	_, err = f.client.GetAccessToken(context.Background(), &pb.GetAccessTokenRequest{Name: c.GetName(), RejectedAccessToken: tok.GetAccessToken()})
	if status.Code(err) != codes.Unavailable {
		t.Fatalf("refresh against a 503: %v, want UNAVAILABLE", err)
	}
	if _, err := f.client.GetConnection(context.Background(), &pb.GetConnectionRequest{Name: c.GetName()}); err != nil {
		t.Fatal(err)
	}

	lines := map[string]map[string]any{} // method and code -> its "finished call" line
	for _, line := range strings.Split(strings.TrimSpace(infoLogs.String()), "\n") {
		var rec map[string]any
		if err := json.Unmarshal([]byte(line), &rec); err != nil {
			t.Fatalf("log line %q: %v", line, err)
		}
		if rec["msg"] == "finished call" {
			lines[fmt.Sprint(rec["grpc.method"], " ", rec["grpc.code"])] = rec
		}
	}
	if l, ok := lines["GetAccessToken OK"]; ok {
		t.Errorf("successful GetAccessToken logged with debug off: %v", l)
	}
	failed, ok := lines["GetAccessToken Unavailable"]
	if !ok {
		t.Fatalf("failed GetAccessToken not logged; lines: %v", lines)
	}
	if ms, _ := failed["grpc.time_ms"].(string); parseMillis(t, ms) < float64(delay.Milliseconds()) {
		t.Errorf("grpc.time_ms = %q, want at least the upstream's %v", ms, delay)
	}
	// RFC 3339 to the second, as the interceptor writes it.
	if start, err := time.Parse(time.RFC3339, fmt.Sprint(failed["grpc.start_time"])); err != nil || start.After(before) || before.Sub(start) > time.Second {
		t.Errorf("grpc.start_time = %v (%v), want the second the call began, %v", failed["grpc.start_time"], err, before.Format(time.RFC3339))
	}
	if failed["level"] != "WARN" || failed["grpc.error"] == nil || failed["caller"] != server.DevIdentity {
		t.Errorf("failed call line = %v, want level WARN with grpc.error and caller", failed)
	}
	// The same fields as a line logged the usual way.
	loud := lines["GetConnection OK"]
	for k := range loud {
		if _, ok := failed[k]; !ok {
			t.Errorf("field %q of GetConnection's line missing from the failed GetAccessToken's: %v", k, failed)
		}
	}
}

func parseMillis(t *testing.T, s string) float64 {
	t.Helper()
	var ms float64
	if _, err := fmt.Sscan(s, &ms); err != nil {
		t.Fatalf("grpc.time_ms %q: %v", s, err)
	}
	return ms
}

// TestShortLivedTokensWithoutMinValidFor: a caller that leaves
// min_valid_for unset never asked for 60 s, so tokens that live 5 s are
// served to it (valid for at least a quarter of their lifetime) and renewed
// about once per lifetime, not refused TOKEN_LIFETIME_TOO_SHORT.
// TestConnection, which asks for no particular validity either, works too.
func TestShortLivedTokensWithoutMinValidFor(t *testing.T) {
	const life = 5 * time.Second
	clk := testkit.NewClock()
	f := newFixture(t, func(o *broker.Options) { o.Now = clk.Now })
	f.idp.SetAccessTokenLifetime(life)
	c := f.create("acme", "erp")
	ctx := context.Background()

	const step, elapsed = 250 * time.Millisecond, 30 * time.Second
	for range elapsed / step {
		clk.Advance(step)
		r, err := f.client.GetAccessToken(ctx, &pb.GetAccessTokenRequest{Name: c.GetName()})
		if err != nil {
			t.Fatalf("at %v: GetAccessToken without min_valid_for: %v", clk.Now().Sub(testkit.Epoch), err)
		}
		if left := r.GetExpireTime().AsTime().Sub(clk.Now()); left < life/4 {
			t.Fatalf("served a token valid for %v of its %v", left, life)
		}
	}
	counts := f.idp.Counts()
	grants := counts.RefreshGrants + counts.PasswordGrants - 1 // the create's
	if lo, hi := int(elapsed/life)-1, int(elapsed/(life*3/4)); grants < lo || grants > hi {
		t.Errorf("%v of calls to %v tokens made %d grants, want about one per lifetime (%d to %d)", elapsed, life, grants, lo, hi)
	}
	if _, err := f.client.TestConnection(ctx, &pb.TestConnectionRequest{Name: c.GetName(), Entities: []string{"SalesOrder"}}); err != nil {
		t.Errorf("TestConnection on %v tokens: %v", life, err)
	}
	// An explicit min_valid_for keeps its strict meaning.
	_, err := f.client.GetAccessToken(ctx, &pb.GetAccessTokenRequest{Name: c.GetName(), MinValidFor: durationpb.New(time.Minute)})
	if info := errorInfo(err); status.Code(err) != codes.FailedPrecondition || info.GetReason() != broker.ReasonTokenTooShort {
		t.Errorf("explicit 60 s of %v tokens: err = %v, want FAILED_PRECONDITION %s", life, err, broker.ReasonTokenTooShort)
	}
}
