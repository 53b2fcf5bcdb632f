package etcd_test

import (
	"context"
	"errors"
	"sync"
	"testing"
	"time"

	clientv3 "go.etcd.io/etcd/client/v3"

	"tokenbroker/storage"
	"tokenbroker/storage/etcdtest"
	"tokenbroker/storage/storetest"
)

// TestAuthorizationTakenOnceAcrossReplicas: a pending authorization put by
// one replica is taken by exactly one of many replicas taking it at once.
func TestAuthorizationTakenOnceAcrossReplicas(t *testing.T) {
	cli := etcdtest.Client(t, etcdtest.Start(t))
	k := storetest.Keyring(t, storetest.Key(1))
	a := openStore(t, cli, k, "/tb/")
	replicas := []interface {
		TakeAuthorization(context.Context, string) (*storage.Authorization, error)
	}{openStore(t, cli, k, "/tb/"), openStore(t, cli, k, "/tb/"), a}
	ctx := context.Background()
	conn := storetest.SampleConn("tenants/a/connections/x")
	want := &storage.Authorization{Name: conn.Name, Conn: conn, Verifier: "v-0123456789012345678901234567890123456789",
		ExpireTime: time.Now().Add(10 * time.Minute)}
	if err := a.PutAuthorization(ctx, "state-hash", want); err != nil {
		t.Fatal(err)
	}
	var mu sync.Mutex
	var got []*storage.Authorization
	var wg sync.WaitGroup
	for range 10 {
		for _, r := range replicas {
			wg.Go(func() {
				p, err := r.TakeAuthorization(ctx, "state-hash")
				if err != nil && !errors.Is(err, storage.ErrNotFound) {
					t.Error(err)
				}
				if p != nil {
					mu.Lock()
					got = append(got, p)
					mu.Unlock()
				}
			})
		}
	}
	wg.Wait()
	if len(got) != 1 {
		t.Fatalf("%d replicas took the authorization, want exactly 1", len(got))
	}
	if got[0].Verifier != want.Verifier || got[0].Conn.ClientSecret != conn.ClientSecret {
		t.Fatalf("taken %+v", got[0])
	}
	resp, err := cli.Get(ctx, "/tb/authorizations/", clientv3.WithPrefix())
	if err != nil || resp.Count != 0 {
		t.Fatalf("left in etcd: %v %v", resp, err)
	}
}
