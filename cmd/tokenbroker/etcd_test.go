package main

import (
	"context"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"

	pb "tokenbroker/gen/tokenbroker/v1"

	"tokenbroker/storage/etcdtest"
)

func TestTwoReplicasOnEtcd(t *testing.T) {
	s, url := idp(t)
	endpoint := etcdtest.Start(t)
	env := []string{"TOKENBROKER_KEY=" + strings.Repeat("C", 43) + "=", "TOKENBROKER_ETCD_ENDPOINTS=" + endpoint}
	a := start(t, env, "--data-dir", filepath.Join(t.TempDir(), "a"), "--listen", "127.0.0.1:0")
	b := start(t, env, "--data-dir", filepath.Join(t.TempDir(), "b"), "--listen", "127.0.0.1:0")
	if a.addr == "" || b.addr == "" {
		t.Fatalf("replicas did not start:\n%s\n%s", a.out.String(), b.out.String())
	}
	ca, cb := a.client(), b.client()
	ctx := context.Background()
	createConnection(t, ca, "tenants/acme", url)
	var first *pb.GetAccessTokenResponse
	deadline := time.Now().Add(10 * time.Second)
	for {
		r, err := cb.GetAccessToken(ctx, &pb.GetAccessTokenRequest{Name: connName})
		if err == nil {
			first = r
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("replica b never saw the connection: %v", err)
		}
		time.Sleep(10 * time.Millisecond)
	}
	// Callers on both replicas report the token rejected at once: one refresh.
	before := s.Counts()
	var wg sync.WaitGroup
	got := make([]string, 100)
	for i := range 100 {
		c := ca
		if i%2 == 1 {
			c = cb
		}
		wg.Add(1)
		go func() {
			defer wg.Done()
			r, err := c.GetAccessToken(ctx, &pb.GetAccessTokenRequest{Name: connName, RejectedAccessToken: first.GetAccessToken()})
			if err != nil {
				t.Error(err)
				return
			}
			got[i] = r.GetAccessToken()
		}()
	}
	wg.Wait()
	after := s.Counts()
	if n := after.RefreshGrants - before.RefreshGrants; n != 1 {
		t.Errorf("refresh grants across two replica processes = %d, want 1", n)
	}
	for i := range got {
		if got[i] == first.GetAccessToken() || got[i] != got[0] {
			t.Fatalf("caller %d got %q", i, got[i])
		}
	}
}
