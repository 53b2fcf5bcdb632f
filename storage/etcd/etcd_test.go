package etcd_test

import (
	"context"
	"errors"
	"fmt"
	"sync/atomic"
	"testing"
	"time"

	clientv3 "go.etcd.io/etcd/client/v3"

	"tokenbroker/storage"
	"tokenbroker/storage/etcd"
	"tokenbroker/storage/etcdtest"
	"tokenbroker/storage/storetest"
)

var (
	key        = storetest.Key
	keyring    = storetest.Keyring
	sampleConn = storetest.SampleConn
)

func sampleTokens() *storage.Tokens { return storetest.SampleTokens() }

func openStore(t *testing.T, cli *clientv3.Client, k *storage.Keyring, prefix string) *etcd.Store {
	t.Helper()
	s, err := etcd.Open(context.Background(), etcd.Options{Client: cli, Keyring: k, Prefix: prefix})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { s.Close() })
	return s
}

// TestContract runs the store contract against one embedded etcd, each
// rule on its own key prefix so that it starts empty.
func TestContract(t *testing.T) {
	cli := etcdtest.Client(t, etcdtest.Start(t))
	var n atomic.Int64
	storetest.Run(t, func(t *testing.T) storetest.Store {
		return openStore(t, cli, keyring(t, key(1)), fmt.Sprintf("/contract-%d/", n.Add(1)))
	})
}

func TestRefusesWrongKeyAndSharesLocks(t *testing.T) {
	cli := etcdtest.Client(t, etcdtest.Start(t))
	a := openStore(t, cli, keyring(t, key(1)), "")
	if _, err := etcd.Open(context.Background(), etcd.Options{Client: cli, Keyring: keyring(t, key(9))}); !errors.Is(err, storage.ErrWrongKey) {
		t.Errorf("wrong key: %v", err)
	}
	b := openStore(t, cli, keyring(t, key(1)), "")
	unlock, err := a.Lock(context.Background(), "tenants/a/connections/x")
	if err != nil {
		t.Fatal(err)
	}
	// Replica b cannot take the lock while a holds it.
	ctx, cancel := context.WithTimeout(context.Background(), 200*time.Millisecond)
	if _, err := b.Lock(ctx, "tenants/a/connections/x"); err == nil {
		t.Error("two replicas held one connection's lock")
	}
	cancel()
	unlock()
	unlock2, err := b.Lock(context.Background(), "tenants/a/connections/x")
	if err != nil {
		t.Fatalf("after unlock: %v", err)
	}
	unlock2()
}

// countingKV counts the range reads made through an etcd client.
type countingKV struct {
	clientv3.KV
	gets *atomic.Int64
}

func (c countingKV) Get(ctx context.Context, key string, opts ...clientv3.OpOption) (*clientv3.GetResponse, error) {
	c.gets.Add(1)
	return c.KV.Get(ctx, key, opts...)
}

// TestLoadAllReadsInPages loads more connections than one etcd range read
// returns: every connection arrives with its own token state (or none), and
// etcd is read in pages, not once per connection.
func TestLoadAllReadsInPages(t *testing.T) {
	var gets atomic.Int64
	cli := etcdtest.Client(t, etcdtest.Start(t))
	cli.KV = countingKV{KV: cli.KV, gets: &gets}
	s := openStore(t, cli, keyring(t, key(1)), "")
	storetest.CreateForLoad(t, s)
	gets.Store(0)
	storetest.CheckLoadAll(t, s)
	if n := gets.Load(); n > 12 {
		t.Errorf("LoadAll made %d etcd range reads for %d connections; want a few per page", n, storetest.LoadAllCount)
	}
}

// TestLockFencesTokenWrites: replica A holds a connection's lock, its
// lease lapses (revoked here, as etcd does when A is paused or cut off for
// longer than the TTL) and replica B takes the lock and commits. A's late
// token writes are refused with ErrLockLost instead of overwriting B's, and
// A takes locks again on a new session once B lets go.
func TestLockFencesTokenWrites(t *testing.T) {
	ep := etcdtest.Start(t)
	cliA, cliB := etcdtest.Client(t, ep), etcdtest.Client(t, ep)
	a, b := openStore(t, cliA, keyring(t, key(1)), ""), openStore(t, cliB, keyring(t, key(1)), "")
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	const name = "tenants/a/connections/x"
	conn, err := a.CreateConnection(ctx, sampleConn(name), sampleTokens())
	if err != nil {
		t.Fatal(err)
	}
	gen := func(g int64) *storage.Tokens {
		tok := sampleTokens()
		tok.Generation = g
		return tok
	}
	unlockA, err := a.Lock(ctx, name)
	if err != nil {
		t.Fatal(err)
	}
	if err := a.PutTokens(ctx, name, gen(2)); err != nil {
		t.Fatalf("write under a held lock: %v", err)
	}
	// A's lease lapses.
	held, err := cliB.Get(ctx, "/tokenbroker/locks/"+name+"/", clientv3.WithPrefix())
	if err != nil || len(held.Kvs) != 1 {
		t.Fatalf("lock keys: %v %v", held, err)
	}
	if _, err := cliB.Revoke(ctx, clientv3.LeaseID(held.Kvs[0].Lease)); err != nil {
		t.Fatal(err)
	}
	unlockB, err := b.Lock(ctx, name)
	if err != nil {
		t.Fatal(err)
	}
	if err := b.PutTokens(ctx, name, gen(3)); err != nil {
		t.Fatal(err)
	}
	if err := a.PutTokens(ctx, name, gen(99)); !errors.Is(err, storage.ErrLockLost) {
		t.Errorf("late PutTokens after the lock lapsed: %v, want ErrLockLost", err)
	}
	upd := conn.Clone()
	upd.DisplayName = "late"
	if _, err := a.UpdateConnection(ctx, upd, gen(99)); !errors.Is(err, storage.ErrLockLost) {
		t.Errorf("late UpdateConnection with tokens after the lock lapsed: %v, want ErrLockLost", err)
	}
	if got, err := b.GetTokens(ctx, name); err != nil || got.Generation != 3 {
		t.Fatalf("stored generation %v (%v), want B's 3", got.Generation, err)
	}
	if got, err := b.GetConnection(ctx, name); err != nil || got.DisplayName == "late" {
		t.Errorf("refused update changed the connection: %v %v", got, err)
	}
	unlockA()
	unlockB()
	// A takes the lock again on a new session and writes under it.
	unlockA, err = a.Lock(ctx, name)
	if err != nil {
		t.Fatalf("lock after the session lapsed: %v", err)
	}
	defer unlockA()
	if err := a.PutTokens(ctx, name, gen(4)); err != nil {
		t.Fatalf("write under the new lock: %v", err)
	}
	// B cannot take the lock while A holds it.
	short, cancelShort := context.WithTimeout(ctx, 300*time.Millisecond)
	defer cancelShort()
	if unlock, err := b.Lock(short, name); err == nil {
		unlock()
		t.Error("B took the lock while A held it")
	}
}
