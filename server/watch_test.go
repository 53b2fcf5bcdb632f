package server_test

import (
	"bytes"
	"context"
	"encoding/json"
	"io"
	"net"
	"net/http"
	"net/http/httptest"
	"strings"
	"testing"
	"time"

	"github.com/prometheus/common/expfmt"
	"github.com/prometheus/common/model"
	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/credentials/insecure"
	"google.golang.org/grpc/status"
	"google.golang.org/protobuf/proto"
	"google.golang.org/protobuf/types/known/durationpb"

	pb "tokenbroker/gen/tokenbroker/v1"

	"tokenbroker/broker"
	"tokenbroker/server"
	"tokenbroker/server/servertest"
)

// noCooldown lets a test rotate a token by rejected reports back to back.
func noCooldown(o *broker.Options) { o.RejectCooldown = -1 }

// recv reads one message of a stream within a deadline.
func recv(t *testing.T, s grpc.ServerStreamingClient[pb.WatchAccessTokenResponse]) (*pb.WatchAccessTokenResponse, error) {
	t.Helper()
	type res struct {
		m   *pb.WatchAccessTokenResponse
		err error
	}
	ch := make(chan res, 1)
	go func() { m, err := s.Recv(); ch <- res{m, err} }()
	select {
	case r := <-ch:
		return r.m, r.err
	case <-time.After(10 * time.Second):
		t.Fatal("no message on the watch stream within 10 s")
		return nil, nil
	}
}

func watchStream(t *testing.T, c pb.TokenBrokerClient, name string) grpc.ServerStreamingClient[pb.WatchAccessTokenResponse] {
	t.Helper()
	ctx, cancel := context.WithCancel(context.Background())
	t.Cleanup(cancel)
	s, err := c.WatchAccessToken(ctx, &pb.WatchAccessTokenRequest{Name: name})
	if err != nil {
		t.Fatal(err)
	}
	return s
}

func TestWatchRotationByAnotherCallersReportReachesTheStream(t *testing.T) {
	f := newFixture(t, noCooldown)
	name := f.create("acme", "erp").GetName()
	s := watchStream(t, f.client, name)
	first, err := recv(t, s)
	if err != nil {
		t.Fatal(err)
	}
	if first.GetExpireTime().AsTime().Before(time.Now().Add(time.Minute)) || first.GetTokenType() != "Bearer" || first.GetInstanceUrl() != f.idpURL {
		t.Fatalf("first message: expire %v type %q url %q", first.GetExpireTime().AsTime(), first.GetTokenType(), first.GetInstanceUrl())
	}
	// A second client reports the token rejected: its rotation is pushed.
	other := pb.NewTokenBrokerClient(f.conn)
	prev := first.GetAccessToken()
	for range 3 {
		rotated, err := other.GetAccessToken(context.Background(), &pb.GetAccessTokenRequest{Name: name, RejectedAccessToken: prev})
		if err != nil {
			t.Fatal(err)
		}
		got, err := recv(t, s)
		if err != nil {
			t.Fatal(err)
		}
		if got.GetAccessToken() != rotated.GetAccessToken() || got.GetAccessToken() == prev {
			t.Fatal("the stream did not push the rotated token")
		}
		prev = got.GetAccessToken()
	}
}

func TestWatchEndsWithNotFoundOnDelete(t *testing.T) {
	f := newFixture(t)
	name := f.create("acme", "erp").GetName()
	s := watchStream(t, f.client, name)
	if _, err := recv(t, s); err != nil {
		t.Fatal(err)
	}
	if _, err := f.client.DeleteConnection(context.Background(), &pb.DeleteConnectionRequest{Name: name}); err != nil {
		t.Fatal(err)
	}
	_, err := recv(t, s)
	if status.Code(err) != codes.NotFound || errorInfo(err).GetReason() != broker.ReasonConnectionNotFound || errorInfo(err).GetMetadata()["connection"] != name {
		t.Fatalf("stream ended with %v, want NOT_FOUND CONNECTION_NOT_FOUND", err)
	}
	// A new watch of the deleted connection fails the same way.
	_, err = recv(t, watchStream(t, f.client, name))
	if status.Code(err) != codes.NotFound {
		t.Fatalf("watch of a deleted connection: %v", err)
	}
}

func TestWatchEndsWithFailedPreconditionOnNeedsReauth(t *testing.T) {
	f := newFixture(t)
	name := f.create("acme", "erp").GetName()
	s := watchStream(t, f.client, name)
	first, err := recv(t, s)
	if err != nil {
		t.Fatal(err)
	}
	f.idp.AddUser(username, "not-the-password") // ends sessions, revokes refresh tokens
	if _, err := f.client.GetAccessToken(context.Background(), &pb.GetAccessTokenRequest{Name: name, RejectedAccessToken: first.GetAccessToken()}); status.Code(err) != codes.FailedPrecondition {
		t.Fatalf("GetAccessToken: %v, want FAILED_PRECONDITION", err)
	}
	_, err = recv(t, s)
	if status.Code(err) != codes.FailedPrecondition || errorInfo(err).GetReason() != broker.ReasonCredentialsRejected {
		t.Fatalf("stream ended with %v, want FAILED_PRECONDITION CREDENTIALS_REJECTED", err)
	}
}

func TestWatchValidatesItsRequest(t *testing.T) {
	f := newFixture(t)
	s, err := f.client.WatchAccessToken(context.Background(), &pb.WatchAccessTokenRequest{Name: "tenants/acme/connections/erp", MinValidFor: durationpb.New(time.Hour)})
	if err != nil {
		t.Fatal(err)
	}
	_, err = recv(t, s)
	if status.Code(err) != codes.InvalidArgument || strings.Join(violationFields(err), ",") != "min_valid_for" {
		t.Fatalf("err = %v, want INVALID_ARGUMENT on min_valid_for", err)
	}
}

func TestWatchAConsumerThatStopsReadingDelaysNoOne(t *testing.T) {
	f := newFixture(t, noCooldown)
	// The instance sits in a long virtual directory (the broker takes URLs
	// of up to 2,048 characters), so that each push is large and a few
	// dozen rotations fill the stalled stream's window.
	dir := "/AcumaticaERP-" + strings.Repeat("d", 1900)
	mux := http.NewServeMux()
	mux.Handle("/", f.idp.Handler()) // where its discovery document points
	mux.Handle(dir+"/", http.StripPrefix(dir, f.idp.Handler()))
	hs := httptest.NewServer(mux)
	defer hs.Close()
	conn := f.connection()
	conn.InstanceUrl = hs.URL + dir
	created, err := f.client.CreateConnection(context.Background(), &pb.CreateConnectionRequest{
		Parent: "tenants/acme", ConnectionId: "erp", Connection: conn,
	})
	if err != nil {
		t.Fatal(err)
	}
	name := created.GetConnection().GetName()
	// The stalled consumer has a connection of its own with a fixed
	// flow-control window (no BDP growth), so that reading nothing fills it.
	cc, err := grpc.NewClient(f.conn.Target(), grpc.WithTransportCredentials(insecure.NewCredentials()),
		grpc.WithInitialWindowSize(window), grpc.WithInitialConnWindowSize(window))
	if err != nil {
		t.Fatal(err)
	}
	defer cc.Close()
	stalled := watchStream(t, pb.NewTokenBrokerClient(cc), name)
	first, err := recv(t, stalled)
	if err != nil {
		t.Fatal(err)
	}
	reader := watchStream(t, f.client, name)
	if _, err := recv(t, reader); err != nil {
		t.Fatal(err)
	}
	// Enough rotations that the stalled stream's messages overrun its
	// window and then the server's write quota for the stream (another
	// 64 KiB), and half as many again: past that, sending to it blocks, and
	// only the broker's not waiting for its watchers keeps the reader and
	// the reporters going.
	rotations := 2 * window / wireSize(first) * 3 / 2
	prev := first.GetAccessToken()
	for i := range rotations {
		ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
		rotated, err := f.client.GetAccessToken(ctx, &pb.GetAccessTokenRequest{Name: name, RejectedAccessToken: prev})
		cancel()
		if err != nil {
			t.Fatalf("rotation %d of %d: %v", i+1, rotations, err)
		}
		got, err := recv(t, reader)
		if err != nil {
			t.Fatal(err)
		}
		if got.GetAccessToken() != rotated.GetAccessToken() {
			t.Fatalf("the reader missed rotation %d of %d", i+1, rotations)
		}
		prev = got.GetAccessToken()
	}
	// The stalled stream did stall: it holds more than its window, and
	// read now it still ends with the newest token.
	held := 0
	for {
		m, err := recv(t, stalled)
		if err != nil {
			t.Fatal(err)
		}
		held += wireSize(m)
		if m.GetAccessToken() == prev {
			break
		}
	}
	t.Logf("%d rotations; the stalled stream held %d bytes", rotations, held)
	if held < window {
		t.Fatalf("the stalled stream was sent %d bytes, less than its %d-byte window: it never stalled", held, window)
	}
}

// window is the HTTP/2 flow-control window of a stream that reads
// nothing: gRPC's least, which turns its window growth off.
const window = 64 << 10

// wireSize is what a message takes of a stream's window: itself and the
// gRPC message header (5 bytes). HTTP/2 frame headers do not count.
func wireSize(m proto.Message) int { return proto.Size(m) + 5 }

func TestWatchIsAuthorizedAuditedAndCounted(t *testing.T) {
	tf := newTLSFixture(t, 0)
	orders := tf.ca.Issue(t, servertest.Leaf{URI: "spiffe://corp.test/svc/orders"})
	unknown := tf.ca.Issue(t, servertest.Leaf{URI: "spiffe://corp.test/svc/stranger"})
	c, _ := tf.client(t, &orders)
	const erp = "tenants/acme/connections/erp"

	if _, err := recv(t, watchStream(t, c, "tenants/globex/connections/erp")); status.Code(err) != codes.PermissionDenied {
		t.Errorf("consumer of acme/erp watching globex: %v, want PERMISSION_DENIED", err)
	}
	cu, _ := tf.client(t, &unknown)
	if _, err := recv(t, watchStream(t, cu, erp)); status.Code(err) != codes.Unauthenticated {
		t.Errorf("unknown caller: %v, want UNAUTHENTICATED", err)
	}

	ctx, cancel := context.WithCancel(context.Background())
	s, err := c.WatchAccessToken(ctx, &pb.WatchAccessTokenRequest{Name: erp})
	if err != nil {
		t.Fatal(err)
	}
	first, err := recv(t, s)
	if err != nil {
		t.Fatal(err)
	}
	if v := scrape(t, tf.hs.URL, "tokenbroker_watch_streams"); v != 1 {
		t.Errorf("open watch streams = %v, want 1", v)
	}
	rotated, err := c.GetAccessToken(context.Background(), &pb.GetAccessTokenRequest{Name: erp, RejectedAccessToken: first.GetAccessToken()})
	if err != nil {
		t.Fatal(err)
	}
	if m, err := recv(t, s); err != nil || m.GetAccessToken() != rotated.GetAccessToken() {
		t.Fatalf("rotation not pushed: %v", err)
	}
	cancel()
	if _, err := s.Recv(); status.Code(err) != codes.Canceled {
		t.Fatalf("after cancel: %v", err)
	}
	// The handler ends once the server sees the cancel; the gauge follows.
	deadline := time.Now().Add(10 * time.Second)
	for scrape(t, tf.hs.URL, "tokenbroker_watch_streams") != 0 {
		if time.Now().After(deadline) {
			t.Fatal("open watch streams gauge did not return to 0")
		}
		time.Sleep(10 * time.Millisecond)
	}
	tf.auditor.Close()

	var pushes []string
	var ends []string
	for _, l := range strings.Split(strings.TrimSpace(tf.audit.String()), "\n") {
		var m map[string]any
		if err := json.Unmarshal([]byte(l), &m); err != nil {
			t.Fatalf("audit line %q: %v", l, err)
		}
		if m["method"] != pb.TokenBroker_WatchAccessToken_FullMethodName {
			continue
		}
		if fp, ok := m["token_fingerprint"].(string); ok {
			if m["caller"] != "spiffe://corp.test/svc/orders" || m["connection"] != erp || m["outcome"] != "OK" {
				t.Errorf("push audit line = %v", m)
			}
			pushes = append(pushes, fp)
		} else {
			ends = append(ends, m["outcome"].(string))
		}
	}
	want := []string{server.Fingerprint(first.GetAccessToken()), server.Fingerprint(rotated.GetAccessToken())}
	if strings.Join(pushes, " ") != strings.Join(want, " ") {
		t.Errorf("audited pushes = %v, want %v", pushes, want)
	}
	if strings.Join(ends, " ") != "PermissionDenied Unauthenticated Canceled" {
		t.Errorf("audited stream ends = %v", ends)
	}
	for _, tok := range []string{first.GetAccessToken(), rotated.GetAccessToken()} {
		if strings.Contains(tf.audit.String(), tok) {
			t.Error("audit log holds a token")
		}
	}
}

// scrape reads one unlabelled gauge or counter from a metrics endpoint.
func scrape(t *testing.T, url, name string) float64 {
	t.Helper()
	resp, err := http.Get(url)
	if err != nil {
		t.Fatal(err)
	}
	body, _ := io.ReadAll(resp.Body)
	resp.Body.Close()
	parser := expfmt.NewTextParser(model.UTF8Validation)
	families, err := parser.TextToMetricFamilies(bytes.NewReader(body))
	if err != nil {
		t.Fatal(err)
	}
	mf, ok := families[name]
	if !ok || len(mf.GetMetric()) != 1 {
		t.Fatalf("metric %s missing", name)
	}
	m := mf.GetMetric()[0]
	if m.GetGauge() != nil {
		return m.GetGauge().GetValue()
	}
	return m.GetCounter().GetValue()
}

func TestWatchStreamsEndWhenTheServerStops(t *testing.T) {
	f := newFixture(t)
	name := f.create("acme", "erp").GetName()
	srv := server.New(server.Options{Broker: f.b, AllowUpstreamCIDRs: loopback})
	lis, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	go srv.Serve(lis)
	cc, err := grpc.NewClient(lis.Addr().String(), grpc.WithTransportCredentials(insecure.NewCredentials()))
	if err != nil {
		t.Fatal(err)
	}
	defer cc.Close()
	s := watchStream(t, pb.NewTokenBrokerClient(cc), name)
	if _, err := recv(t, s); err != nil {
		t.Fatal(err)
	}
	// A stream never ends by itself: GracefulStop must end it, or it would
	// wait for it forever.
	stopped := make(chan struct{})
	go func() { srv.GracefulStop(); close(stopped) }()
	_, err = recv(t, s)
	if status.Code(err) != codes.Unavailable || errorInfo(err).GetReason() != "SHUTTING_DOWN" {
		t.Fatalf("stream ended with %v, want UNAVAILABLE SHUTTING_DOWN", err)
	}
	select {
	case <-stopped:
	case <-time.After(10 * time.Second):
		t.Fatal("GracefulStop did not return with a watch stream open")
	}
}

func TestWatchStreamsCountAgainstTheCallersRateLimit(t *testing.T) {
	tf := newTLSFixture(t, 5)
	orders := tf.ca.Issue(t, servertest.Leaf{URI: "spiffe://corp.test/svc/orders"})
	c, _ := tf.client(t, &orders)
	exhausted := 0
	for range 20 {
		_, err := recv(t, watchStream(t, c, "tenants/acme/connections/erp"))
		if status.Code(err) == codes.ResourceExhausted {
			exhausted++
		}
	}
	if exhausted < 10 {
		t.Errorf("rate limited %d of 20 streams at 5/s burst 5, want at least 10", exhausted)
	}
}

// TestWatchShortLivedTokensWithoutMinValidFor: a watch that leaves
// min_valid_for unset gets tokens that live 2 s (each valid for at least a
// quarter of that when sent), and a new one as each comes near its end,
// not TOKEN_LIFETIME_TOO_SHORT for a 60 s it never asked for.
func TestWatchShortLivedTokensWithoutMinValidFor(t *testing.T) {
	const life = 2 * time.Second
	f := newFixture(t)
	f.idp.SetAccessTokenLifetime(life)
	name := f.create("acme", "erp").GetName()
	s := watchStream(t, f.client, name)
	seen := map[string]bool{}
	for i := range 3 {
		m, err := recv(t, s)
		if err != nil {
			t.Fatalf("message %d: %v", i, err)
		}
		// The send may lag the check by scheduling; a token this close to
		// its end was not valid for a quarter of its life when checked.
		if left := time.Until(m.GetExpireTime().AsTime()); left < life/8 {
			t.Errorf("message %d: token valid for %v of %v", i, left, life)
		}
		if seen[m.GetAccessToken()] {
			t.Errorf("message %d repeats a token", i)
		}
		seen[m.GetAccessToken()] = true
	}
}
