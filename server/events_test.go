package server_test

import (
	"context"
	"fmt"
	"strings"
	"testing"
	"time"

	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"
	"google.golang.org/protobuf/types/known/fieldmaskpb"

	pb "tokenbroker/gen/tokenbroker/v1"

	"tokenbroker/broker"
	"tokenbroker/broker/acumaticatest"
	"tokenbroker/internal/testkit"
	"tokenbroker/server"
	"tokenbroker/server/servertest"
	"tokenbroker/storage"
)

// watch opens WatchConnections and returns a function that reads the next
// message, failing the test after 10 s without one.
func watch(t *testing.T, c pb.TokenBrokerClient, req *pb.WatchConnectionsRequest) (next func() *pb.WatchConnectionsResponse, stop func()) {
	t.Helper()
	ctx, cancel := context.WithCancel(context.Background())
	t.Cleanup(cancel)
	stream, err := c.WatchConnections(ctx, req)
	if err != nil {
		t.Fatal(err)
	}
	msgs := make(chan *pb.WatchConnectionsResponse, 100)
	errs := make(chan error, 1)
	go func() {
		for {
			m, err := stream.Recv()
			if err != nil {
				errs <- err
				return
			}
			msgs <- m
		}
	}()
	return func() *pb.WatchConnectionsResponse {
		t.Helper()
		select {
		case m := <-msgs:
			return m
		case err := <-errs:
			t.Fatalf("watch ended: %v", err)
		case <-time.After(10 * time.Second):
			t.Fatal("no watch message within 10 s")
		}
		return nil
	}, cancel
}

// brief is a message as the tests compare it: type, connection, state
// (previous state for state changes).
func brief(m *pb.WatchConnectionsResponse) string {
	s := m.GetType().String() + " " + m.GetConnection().GetName() + " " + m.GetConnection().GetState().String()
	if m.GetType() == pb.WatchConnectionsResponse_TYPE_STATE_CHANGED {
		s += " from " + m.GetPreviousState().String()
	}
	if m.GetResync() {
		s += " resync"
	}
	return s
}

// TestWatchConnectionsSeesEachTransition drives a connection ACTIVE →
// DEGRADED → ACTIVE → NEEDS_REAUTH → (credential update) ACTIVE against
// the stand-in: a watching client gets exactly those events, in order,
// with increasing sequences; one that reconnects with the sequence it
// stopped at gets what it missed, and one with a sequence of another feed
// is told to resync.
func TestWatchConnectionsSeesEachTransition(t *testing.T) {
	clk := testkit.NewClock()
	f := newFixture(t, func(o *broker.Options) { o.Now = clk.Now })
	if _, err := f.b.Load(context.Background()); err != nil {
		t.Fatal(err)
	}
	next, _ := watch(t, f.client, &pb.WatchConnectionsRequest{Parent: "tenants/acme"})
	early, stopEarly := watch(t, f.client, &pb.WatchConnectionsRequest{Parent: "tenants/acme"})
	if m := next(); m.GetType() != pb.WatchConnectionsResponse_TYPE_SYNCED || m.GetConnection() != nil {
		t.Fatalf("first message with no connections = %v, want TYPE_SYNCED", m)
	}
	if m := early(); m.GetType() != pb.WatchConnectionsResponse_TYPE_SYNCED {
		t.Fatalf("first message = %v", m)
	}

	const name = "tenants/acme/connections/erp"
	ctx := context.Background()
	f.create("acme", "erp")
	f.create("globex", "erp") // another tenant: not watched
	tok, err := f.client.GetAccessToken(ctx, &pb.GetAccessTokenRequest{Name: name})
	if err != nil {
		t.Fatal(err)
	}
	// DEGRADED: the refresh a rejected token triggers meets a 503.
	f.idp.Inject(acumaticatest.Fault{Status: 503})
	if _, err := f.client.GetAccessToken(ctx, &pb.GetAccessTokenRequest{Name: name, RejectedAccessToken: tok.GetAccessToken()}); err == nil {
		t.Fatal("refresh against a 503 succeeded")
	}
	// The early watcher stops here, at DEGRADED.
	early()
	degraded := early()
	stopEarly()
	// ACTIVE again once upstream answers.
	clk.Advance(time.Minute)
	tok, err = f.client.GetAccessToken(ctx, &pb.GetAccessTokenRequest{Name: name, RejectedAccessToken: tok.GetAccessToken()})
	if err != nil {
		t.Fatal(err)
	}
	// NEEDS_REAUTH: the client secret was rotated away in Acumatica.
	f.idp.AddClient(clientID, "new-secret-value")
	clk.Advance(time.Minute)
	if _, err := f.client.GetAccessToken(ctx, &pb.GetAccessTokenRequest{Name: name, RejectedAccessToken: tok.GetAccessToken()}); status.Code(err) != codes.FailedPrecondition {
		t.Fatalf("err = %v, want FAILED_PRECONDITION", err)
	}
	// An operator updates the credentials: ACTIVE.
	if _, err := f.client.UpdateConnection(ctx, &pb.UpdateConnectionRequest{
		Connection: &pb.Connection{Name: name, ClientSecret: "new-secret-value"},
		UpdateMask: &fieldmaskpb.FieldMask{Paths: []string{"client_secret"}},
	}); err != nil {
		t.Fatal(err)
	}

	want := []string{
		"TYPE_CREATED " + name + " STATE_ACTIVE",
		"TYPE_STATE_CHANGED " + name + " STATE_DEGRADED from STATE_ACTIVE",
		"TYPE_STATE_CHANGED " + name + " STATE_ACTIVE from STATE_DEGRADED",
		"TYPE_STATE_CHANGED " + name + " STATE_NEEDS_REAUTH from STATE_ACTIVE",
		"TYPE_UPDATED " + name + " STATE_NEEDS_REAUTH",
		"TYPE_STATE_CHANGED " + name + " STATE_ACTIVE from STATE_NEEDS_REAUTH",
	}
	var got []*pb.WatchConnectionsResponse
	for i, w := range want {
		m := next()
		got = append(got, m)
		if brief(m) != w {
			t.Fatalf("event %d = %q, want %q", i, brief(m), w)
		}
		if i > 0 && m.GetSequence() <= got[i-1].GetSequence() {
			t.Errorf("event %d sequence %d after %d", i, m.GetSequence(), got[i-1].GetSequence())
		}
	}
	if r := got[3].GetConnection().GetStatus().GetStateReason(); r != "CLIENT_REJECTED" {
		t.Errorf("NEEDS_REAUTH state_reason = %q", r)
	}
	if got[1].GetConnection().GetStatus().GetLastError().GetCode() != "UPSTREAM_UNAVAILABLE" {
		t.Errorf("DEGRADED last_error = %v", got[1].GetConnection().GetStatus().GetLastError())
	}

	// Reconnect after DEGRADED: the four events missed, then TYPE_SYNCED.
	if degraded.GetSequence() != got[1].GetSequence() {
		t.Fatalf("the early watcher's DEGRADED has sequence %d, the other's %d", degraded.GetSequence(), got[1].GetSequence())
	}
	resumed, _ := watch(t, f.client, &pb.WatchConnectionsRequest{Parent: "tenants/acme", AfterSequence: degraded.GetSequence(), FeedId: degraded.GetFeedId()})
	for i, w := range want[2:] {
		if m := resumed(); brief(m) != w || m.GetSequence() != got[i+2].GetSequence() {
			t.Fatalf("replayed %d = %q seq %d, want %q seq %d", i, brief(m), m.GetSequence(), w, got[i+2].GetSequence())
		}
	}
	if m := resumed(); m.GetType() != pb.WatchConnectionsResponse_TYPE_SYNCED || m.GetResync() {
		t.Fatalf("after the replay: %v, want TYPE_SYNCED without resync", m)
	}

	// A sequence from another feed (a restarted server) cannot be resumed.
	other, _ := watch(t, f.client, &pb.WatchConnectionsRequest{Parent: "tenants/acme", AfterSequence: degraded.GetSequence(), FeedId: "0123456789abcdef"})
	if m := other(); brief(m) != "TYPE_EXISTING "+name+" STATE_ACTIVE resync" {
		t.Fatalf("resync: %q", brief(m))
	}
	if m := other(); m.GetType() != pb.WatchConnectionsResponse_TYPE_SYNCED || !m.GetResync() || m.GetSequence() != got[5].GetSequence() {
		t.Fatalf("resync end: %v", m)
	}
}

// TestWatchConnectionsIsForOperatorsOfTheTenant: a consumer is denied, an
// operator of one tenant is denied another and sees only its own under
// tenants/-, and bad requests are INVALID_ARGUMENT.
func TestWatchConnectionsIsForOperatorsOfTheTenant(t *testing.T) {
	tf := newTLSFixture(t, 0)
	if _, err := tf.b.Load(context.Background()); err != nil {
		t.Fatal(err)
	}
	recvErr := func(c pb.TokenBrokerClient, parent string) error {
		ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
		defer cancel()
		s, err := c.WatchConnections(ctx, &pb.WatchConnectionsRequest{Parent: parent})
		if err != nil {
			return err
		}
		_, err = s.Recv()
		return err
	}
	orders := tf.ca.Issue(t, servertest.Leaf{URI: "spiffe://corp.test/svc/orders"})
	consumer, _ := tf.client(t, &orders)
	if err := recvErr(consumer, "tenants/acme"); status.Code(err) != codes.PermissionDenied {
		t.Errorf("consumer: %v, want PERMISSION_DENIED", err)
	}
	acmeOps := tf.ca.Issue(t, servertest.Leaf{URI: "spiffe://corp.test/ops/acme-oncall"})
	op, _ := tf.client(t, &acmeOps)
	if err := recvErr(op, "tenants/globex"); status.Code(err) != codes.PermissionDenied {
		t.Errorf("acme operator on globex: %v, want PERMISSION_DENIED", err)
	}
	if err := recvErr(op, "tenants/Bad!"); status.Code(err) != codes.InvalidArgument {
		t.Errorf("bad parent: %v, want INVALID_ARGUMENT", err)
	}
	next, _ := watch(t, op, &pb.WatchConnectionsRequest{Parent: "tenants/-"})
	var names []string
	for m := next(); m.GetType() == pb.WatchConnectionsResponse_TYPE_EXISTING; m = next() {
		names = append(names, m.GetConnection().GetName())
	}
	if fmt.Sprint(names) != "[tenants/acme/connections/erp tenants/acme/connections/other]" {
		t.Errorf("acme operator's tenants/- lists %v", names)
	}
	// A change in globex is not sent; one in acme is.
	if err := tf.b.DeleteConnection(context.Background(), "tenants/globex/connections/erp", ""); err != nil {
		t.Fatal(err)
	}
	if err := tf.b.DeleteConnection(context.Background(), "tenants/acme/connections/other", ""); err != nil {
		t.Fatal(err)
	}
	if m := next(); brief(m) != "TYPE_DELETED tenants/acme/connections/other STATE_ACTIVE" {
		t.Errorf("after deleting globex's and then acme's: %q", brief(m))
	}
}

// TestWatchConnectionsEndsOnShutdown: EndWatches, which the binary calls
// as it stops, ends open watches with UNAVAILABLE (so clients reconnect
// elsewhere) and lets a graceful stop finish.
func TestWatchConnectionsEndsOnShutdown(t *testing.T) {
	f := newFixture(t)
	if _, err := f.b.Load(context.Background()); err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	s, err := f.client.WatchConnections(ctx, &pb.WatchConnectionsRequest{Parent: "tenants/-"})
	if err != nil {
		t.Fatal(err)
	}
	if m, err := s.Recv(); err != nil || m.GetType() != pb.WatchConnectionsResponse_TYPE_SYNCED {
		t.Fatalf("first message %v, %v", m, err)
	}
	f.b.EndWatches()
	if _, err := s.Recv(); status.Code(err) != codes.Unavailable {
		t.Fatalf("after EndWatches: %v, want UNAVAILABLE", err)
	}
}

// TestWatchConnectionsEndsWhenAPolicyReloadRemovesTheOperator: a policy
// reload that takes the operator role of the requested tenant away ends
// an open WatchConnections stream with PERMISSION_DENIED at its next
// event, and no view of that tenant is sent after the reload.
func TestWatchConnectionsEndsWhenAPolicyReloadRemovesTheOperator(t *testing.T) {
	p, err := server.ParsePolicy([]byte(testPolicy))
	if err != nil {
		t.Fatal(err)
	}
	az := server.NewAuthorizer(p)
	tf := newTLSFixture(t, 0, func(o *server.Options) { o.Authorizer = az })
	if _, err := tf.b.Load(context.Background()); err != nil {
		t.Fatal(err)
	}
	acmeOps := tf.ca.Issue(t, servertest.Leaf{URI: "spiffe://corp.test/ops/acme-oncall"})
	op, _ := tf.client(t, &acmeOps)
	for _, parent := range []string{"tenants/acme", "tenants/-"} {
		t.Run(parent, func(t *testing.T) {
			az.SetPolicy(p)
			ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
			defer cancel()
			stream, err := op.WatchConnections(ctx, &pb.WatchConnectionsRequest{Parent: parent})
			if err != nil {
				t.Fatal(err)
			}
			for {
				m, err := stream.Recv()
				if err != nil {
					t.Fatalf("before the reload: %v", err)
				}
				if m.GetType() == pb.WatchConnectionsResponse_TYPE_SYNCED {
					break
				}
			}
			// The same caller, now a consumer of acme only.
			demoted, err := server.ParsePolicy([]byte(strings.Replace(testPolicy,
				"  - identities: [\"spiffe://corp.test/ops/acme-*\"]\n    role: operator\n",
				"  - identities: [\"spiffe://corp.test/ops/acme-*\"]\n    role: consumer\n", 1)))
			if err != nil {
				t.Fatal(err)
			}
			az.SetPolicy(demoted)
			if _, err := tf.b.UpdateConnection(context.Background(), "tenants/acme/connections/erp",
				&storage.Connection{DisplayName: "after reload " + parent}, []string{"display_name"}, "", false); err != nil {
				t.Fatal(err)
			}
			m, err := stream.Recv()
			if status.Code(err) != codes.PermissionDenied {
				t.Fatalf("after the reload got %q, %v; want the stream to end with PERMISSION_DENIED", brief(m), err)
			}
		})
	}
}

// TestWatchConnectionsResumeNeedsTheFeedID: a sequence means nothing
// without the feed it came from (each replica and restart has its own),
// so resuming without feed_id is refused with INVALID_ARGUMENT on feed_id
// rather than replaying this server's events after another's sequence.
func TestWatchConnectionsResumeNeedsTheFeedID(t *testing.T) {
	f := newFixture(t)
	f.create("acme", "erp")
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	stream, err := f.client.WatchConnections(ctx, &pb.WatchConnectionsRequest{Parent: "tenants/acme", AfterSequence: 1})
	if err == nil {
		_, err = stream.Recv()
	}
	if status.Code(err) != codes.InvalidArgument || fmt.Sprint(violationFields(err)) != "[feed_id]" {
		t.Fatalf("after_sequence without feed_id: %v (fields %v), want INVALID_ARGUMENT on feed_id", err, violationFields(err))
	}
}

// TestWatchConnectionsFollowsAPolicyReloadOfTenants: on a tenants/-
// stream, an operator moved by a reload from acme to globex is no longer
// sent acme's changes, and is sent globex's.
func TestWatchConnectionsFollowsAPolicyReloadOfTenants(t *testing.T) {
	p, err := server.ParsePolicy([]byte(testPolicy))
	if err != nil {
		t.Fatal(err)
	}
	az := server.NewAuthorizer(p)
	tf := newTLSFixture(t, 0, func(o *server.Options) { o.Authorizer = az })
	if _, err := tf.b.Load(context.Background()); err != nil {
		t.Fatal(err)
	}
	acmeOps := tf.ca.Issue(t, servertest.Leaf{URI: "spiffe://corp.test/ops/acme-oncall"})
	op, _ := tf.client(t, &acmeOps)
	next, _ := watch(t, op, &pb.WatchConnectionsRequest{Parent: "tenants/-"})
	for m := next(); m.GetType() != pb.WatchConnectionsResponse_TYPE_SYNCED; m = next() {
	}
	moved, err := server.ParsePolicy([]byte(strings.Replace(testPolicy,
		"  - identities: [\"spiffe://corp.test/ops/acme-*\"]\n    role: operator\n    tenants: [\"acme\"]\n",
		"  - identities: [\"spiffe://corp.test/ops/acme-*\"]\n    role: operator\n    tenants: [\"globex\"]\n", 1)))
	if err != nil {
		t.Fatal(err)
	}
	az.SetPolicy(moved)
	for _, name := range []string{"tenants/acme/connections/erp", "tenants/globex/connections/erp"} {
		if _, err := tf.b.UpdateConnection(context.Background(), name, &storage.Connection{DisplayName: "after reload"},
			[]string{"display_name"}, "", false); err != nil {
			t.Fatal(err)
		}
	}
	if m := next(); brief(m) != "TYPE_UPDATED tenants/globex/connections/erp STATE_ACTIVE" {
		t.Fatalf("after moving the operator to globex: %q, want globex's update only", brief(m))
	}
}
