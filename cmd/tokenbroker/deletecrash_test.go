package main

import (
	"context"
	"net/http"
	"net/http/httptest"
	"path/filepath"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"

	pb "tokenbroker/gen/tokenbroker/v1"

	"tokenbroker/broker/acumaticatest"
)

// TestKill9DuringDeleteDoesNotResurrect kills the binary while its delete
// is at the upstream revocation endpoint (revoked upstream, not yet erased
// locally). After the restart the connection is neither listed nor served,
// and the restart revokes again.
func TestKill9DuringDeleteDoesNotResurrect(t *testing.T) {
	s := acumaticatest.New(acumaticatest.Options{})
	s.AddClient(clientID, clientSecret)
	s.AddUser(username, password)
	var hold atomic.Bool
	atRevoke := make(chan struct{}, 1)
	h := s.Handler()
	hs := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		if hold.Load() && strings.HasSuffix(r.URL.Path, "/revocation") {
			// Revoke upstream, then hold the answer: the kill comes here.
			h.ServeHTTP(httptest.NewRecorder(), r)
			select {
			case atRevoke <- struct{}{}:
			default:
			}
			<-r.Context().Done()
			return
		}
		h.ServeHTTP(w, r)
	}))
	t.Cleanup(hs.Close)

	dir := filepath.Join(t.TempDir(), "data")
	p := start(t, nil, "--data-dir", dir, "--listen", "127.0.0.1:0")
	c := p.client()
	ctx := context.Background()
	createConnection(t, c, "tenants/acme", hs.URL)
	if _, err := c.GetAccessToken(ctx, &pb.GetAccessTokenRequest{Name: connName}); err != nil {
		t.Fatal(err)
	}
	hold.Store(true)
	go c.DeleteConnection(ctx, &pb.DeleteConnectionRequest{Name: connName})
	select {
	case <-atRevoke:
	case <-time.After(20 * time.Second):
		t.Fatalf("the delete never reached the revocation endpoint:\n%s", p.out.String())
	}
	p.kill9()
	hold.Store(false)
	revoked := s.Counts().Revocations

	p2 := start(t, nil, "--data-dir", dir, "--listen", "127.0.0.1:0")
	c2 := p2.client()
	list, err := c2.ListConnections(ctx, &pb.ListConnectionsRequest{Parent: "tenants/acme"})
	if err != nil {
		t.Fatal(err)
	}
	if len(list.GetConnections()) != 0 {
		t.Errorf("after the restart the deleted connection is listed: %v", list.GetConnections()[0].GetState())
	}
	if _, err := c2.GetAccessToken(ctx, &pb.GetAccessTokenRequest{Name: connName}); status.Code(err) != codes.NotFound {
		t.Errorf("after the restart GetAccessToken: %v; want NOT_FOUND", err)
	}
	if !p2.waitOutput("finishing a delete interrupted at last stop", 10*time.Second) || !p2.waitOutput(`"msg":"connection deleted"`, 20*time.Second) {
		t.Errorf("the restart did not finish the delete:\n%s", p2.out.String())
	}
	if got := s.Counts().Revocations; got <= revoked {
		t.Errorf("the restart did not revoke again (%d revocations, %d before):\n%s", got, revoked, p2.out.String())
	}
	p2.stop()
	// The delete is finished for good: the next start has nothing to finish.
	p3 := start(t, nil, "--data-dir", dir, "--listen", "127.0.0.1:0")
	if p3.waitOutput("finishing a delete", 2*time.Second) {
		t.Error("the delete was not erased at the first restart")
	}
}
