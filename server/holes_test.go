package server_test

import (
	"bytes"
	"context"
	"slices"
	"testing"

	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/mem"
	"google.golang.org/grpc/status"
	"google.golang.org/protobuf/proto"
	"google.golang.org/protobuf/types/known/fieldmaskpb"

	pb "tokenbroker/gen/tokenbroker/v1"
)

// rawCodec sends requests as the bytes given, so that a test can put on the
// wire what no protobuf library would encode.
type rawCodec struct{}

func (rawCodec) Marshal(v any) (mem.BufferSlice, error) {
	return mem.BufferSlice{mem.SliceBuffer(v.([]byte))}, nil
}

func (rawCodec) Unmarshal(data mem.BufferSlice, v any) error {
	return proto.Unmarshal(data.Materialize(), v.(proto.Message))
}

func (rawCodec) Name() string { return "proto" }

// withBadUTF8 encodes m, then overwrites each marker in the wire bytes with
// as many bytes that are not UTF-8.
func withBadUTF8(t *testing.T, m proto.Message, markers ...string) []byte {
	t.Helper()
	b, err := proto.Marshal(m)
	if err != nil {
		t.Fatal(err)
	}
	for _, mk := range markers {
		if bytes.Count(b, []byte(mk)) != 1 {
			t.Fatalf("marker %q not once in the message", mk)
		}
		b = bytes.Replace(b, []byte(mk), bytes.Repeat([]byte{0xff}, len(mk)), 1)
	}
	return b
}

func TestInvalidUTF8IsInvalidArgumentNamingTheField(t *testing.T) {
	f := newFixture(t)
	ctx := context.Background()
	existing := f.create("acme", "erp")
	const bad = "BADUTF8MARK"
	conn := func(mut func(*pb.Connection)) *pb.Connection {
		c := f.connection()
		mut(c)
		return c
	}
	for _, tc := range []struct {
		name   string
		method string
		wire   []byte
		fields []string
	}{
		{"client_id", "CreateConnection", withBadUTF8(t, &pb.CreateConnectionRequest{Parent: "tenants/acme", ConnectionId: "new",
			Connection: conn(func(c *pb.Connection) { c.ClientId = bad })}, bad), []string{"connection.client_id"}},
		{"display_name and password", "CreateConnection", withBadUTF8(t, &pb.CreateConnectionRequest{Parent: "tenants/acme", ConnectionId: "new",
			Connection: conn(func(c *pb.Connection) { c.DisplayName, c.Password = bad, bad+"2" })}, bad+"2", bad), []string{"connection.display_name", "connection.password"}},
		{"a scope", "CreateConnection", withBadUTF8(t, &pb.CreateConnectionRequest{Parent: "tenants/acme", ConnectionId: "new",
			Connection: conn(func(c *pb.Connection) { c.Scopes = []string{"api", bad} })}, bad), []string{"connection.scopes[1]"}},
		{"connection id", "CreateConnection", withBadUTF8(t, &pb.CreateConnectionRequest{Parent: "tenants/acme", ConnectionId: bad,
			Connection: f.connection()}, bad), []string{"connection_id"}},
		{"update outside the mask", "UpdateConnection", withBadUTF8(t, &pb.UpdateConnectionRequest{
			Connection: &pb.Connection{Name: existing.GetName(), DisplayName: "fine", Username: bad},
			UpdateMask: &fieldmaskpb.FieldMask{Paths: []string{"display_name"}}}, bad), []string{"connection.username"}},
		{"name", "GetConnection", withBadUTF8(t, &pb.GetConnectionRequest{Name: "tenants/acme/connections/" + bad}, bad), []string{"name"}},
		{"rejected token", "GetAccessToken", withBadUTF8(t, &pb.GetAccessTokenRequest{Name: existing.GetName(), RejectedAccessToken: bad}, bad), []string{"rejected_access_token"}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			var out pb.Connection // any message: no answer is expected
			err := f.conn.Invoke(ctx, "/tokenbroker.v1.TokenBroker/"+tc.method, tc.wire, &out, grpc.ForceCodecV2(rawCodec{}))
			if status.Code(err) != codes.InvalidArgument {
				t.Fatalf("code = %v (%v), want INVALID_ARGUMENT", status.Code(err), err)
			}
			if got := violationFields(err); !slices.Equal(got, tc.fields) {
				t.Errorf("field violations = %v, want %v", got, tc.fields)
			}
		})
	}
	list, err := f.client.ListConnections(ctx, &pb.ListConnectionsRequest{Parent: "tenants/-"})
	if err != nil || len(list.GetConnections()) != 1 {
		t.Errorf("after the refusals: %v %v, want only the connection made first", list, err)
	}
	got, err := f.client.GetConnection(ctx, &pb.GetConnectionRequest{Name: existing.GetName()})
	if err != nil || got.GetConnection().GetDisplayName() != existing.GetDisplayName() {
		t.Errorf("existing connection changed: %v %v", got, err)
	}
}

func TestInputHolesAreRefused(t *testing.T) {
	f := newFixture(t)
	ctx := context.Background()
	for _, tc := range []struct {
		name  string
		mut   func(*pb.Connection)
		field string
	}{
		{"empty port", func(c *pb.Connection) { c.InstanceUrl = "https://erp.example.com:" }, "connection.instance_url"},
		{"empty port with a path", func(c *pb.Connection) { c.InstanceUrl = "https://erp.example.com:/AcumaticaERP" }, "connection.instance_url"},
		{"encoded dot-dot", func(c *pb.Connection) { c.InstanceUrl = "https://erp.example.com/a/%2e%2e/identity" }, "connection.instance_url"},
		{"half-encoded dot-dot", func(c *pb.Connection) { c.InstanceUrl = "https://erp.example.com/a/%2E." }, "connection.instance_url"},
		{"encoded dot", func(c *pb.Connection) { c.InstanceUrl = "https://erp.example.com/%2e/x" }, "connection.instance_url"},
		{"encoded slash", func(c *pb.Connection) { c.InstanceUrl = "https://erp.example.com/a%2F..%2Fb" }, "connection.instance_url"},
		{"encoded NUL in the path", func(c *pb.Connection) { c.InstanceUrl = "https://erp.example.com/a%00" }, "connection.instance_url"},
		{"NUL in client_id", func(c *pb.Connection) { c.ClientId += "\x00" }, "connection.client_id"},
		{"ESC in client_id", func(c *pb.Connection) { c.ClientId += "\x1b[31m" }, "connection.client_id"},
		{"DEL in client_id", func(c *pb.Connection) { c.ClientId += "\x7f" }, "connection.client_id"},
		{"C1 in client_id", func(c *pb.Connection) { c.ClientId += "\u0085" }, "connection.client_id"},
		{"ESC in display_name", func(c *pb.Connection) { c.DisplayName = "Acme\x1b[2J" }, "connection.display_name"},
		{"newline in display_name", func(c *pb.Connection) { c.DisplayName = "Acme\nforged log line" }, "connection.display_name"},
		{"U+FFFD in display_name", func(c *pb.Connection) { c.DisplayName = "Acme\uFFFD" }, "connection.display_name"},
		{"NUL in username", func(c *pb.Connection) { c.Username = "integration\x00" }, "connection.username"},
		{"C1 in password", func(c *pb.Connection) { c.Password = "pass\u009bword" }, "connection.password"},
		{"NUL in client_secret", func(c *pb.Connection) { c.ClientSecret = "sec\x00ret" }, "connection.client_secret"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			c := f.connection()
			tc.mut(c)
			// validate_only: even a broker that let the input through
			// would send nothing to the hosts named here.
			_, err := f.client.CreateConnection(ctx, &pb.CreateConnectionRequest{Parent: "tenants/acme", ConnectionId: "new", Connection: c, ValidateOnly: true})
			if status.Code(err) != codes.InvalidArgument || !slices.Equal(violationFields(err), []string{tc.field}) {
				t.Errorf("err = %v (fields %v), want INVALID_ARGUMENT on %s", err, violationFields(err), tc.field)
			}
		})
	}
	if n := f.idp.Counts().PasswordGrants; n != 0 {
		t.Errorf("%d password grants sent for refused input", n)
	}
	list, err := f.client.ListConnections(ctx, &pb.ListConnectionsRequest{Parent: "tenants/-"})
	if err != nil || len(list.GetConnections()) != 0 {
		t.Errorf("stored after refusals: %v %v", list, err)
	}
}

// An etag read before a delete and re-create under the same name does not
// pass for the new connection's.
func TestETagOfAnEarlierIncarnationIsAConflict(t *testing.T) {
	f := newFixture(t)
	ctx := context.Background()
	old := f.create("acme", "erp")
	if _, err := f.client.DeleteConnection(ctx, &pb.DeleteConnectionRequest{Name: old.GetName()}); err != nil {
		t.Fatal(err)
	}
	renewed := f.create("acme", "erp")
	_, err := f.client.UpdateConnection(ctx, &pb.UpdateConnectionRequest{
		Connection: &pb.Connection{Name: old.GetName(), DisplayName: "Stale", Etag: old.GetEtag()},
		UpdateMask: &fieldmaskpb.FieldMask{Paths: []string{"display_name"}},
	})
	if status.Code(err) != codes.Aborted {
		t.Errorf("update with the old incarnation's etag: %v, want ABORTED", err)
	}
	if _, err := f.client.DeleteConnection(ctx, &pb.DeleteConnectionRequest{Name: old.GetName(), Etag: old.GetEtag()}); status.Code(err) != codes.Aborted {
		t.Errorf("delete with the old incarnation's etag: %v, want ABORTED", err)
	}
	got, err := f.client.GetConnection(ctx, &pb.GetConnectionRequest{Name: old.GetName()})
	if err != nil || got.GetConnection().GetDisplayName() != renewed.GetDisplayName() {
		t.Fatalf("the new connection changed: %v %v", got, err)
	}
	// Its own etag still works.
	if _, err := f.client.UpdateConnection(ctx, &pb.UpdateConnectionRequest{
		Connection: &pb.Connection{Name: old.GetName(), DisplayName: "Fresh", Etag: renewed.GetEtag()},
		UpdateMask: &fieldmaskpb.FieldMask{Paths: []string{"display_name"}},
	}); err != nil {
		t.Errorf("update with the current etag: %v", err)
	}
}
