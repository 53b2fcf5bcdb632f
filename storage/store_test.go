package storage_test

import (
	"bytes"
	"context"
	"crypto/sha256"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"sync"
	"testing"
	"time"

	"github.com/google/go-cmp/cmp"
	bolt "go.etcd.io/bbolt"
	clientv3 "go.etcd.io/etcd/client/v3"

	"tokenbroker/storage"
	"tokenbroker/storage/etcdtest"
)

func key(b byte) []byte { return bytes.Repeat([]byte{b}, storage.KeySize) }

func keyring(t *testing.T, keys ...[]byte) *storage.Keyring {
	t.Helper()
	k, err := storage.NewKeyring(keys...)
	if err != nil {
		t.Fatal(err)
	}
	return k
}

func openStore(t *testing.T, path string, k *storage.Keyring) *storage.BoltStore {
	t.Helper()
	s, err := storage.Open(path, storage.Options{Keyring: k, LockTimeout: 200 * time.Millisecond})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { s.Close() })
	return s
}

const (
	secret   = "client-SECRET-0123456789abcdef"
	password = "user-PASSWORD-0123456789abcdef"
	refresh  = "rt-REFRESH-0123456789abcdef"
	access   = "at-ACCESS-0123456789abcdef"
)

func sampleConn(name string) *storage.Connection {
	return &storage.Connection{
		Name: name, DisplayName: "ERP", InstanceURL: "https://erp.example.com", ClientID: "G@T",
		ClientSecret: secret, Username: "u", Password: password, Scopes: []string{"api", "offline_access"},
		SlidingLifetime: 15 * 24 * time.Hour, CreateTime: time.Unix(1700000000, 0).UTC(), UpdateTime: time.Unix(1700000000, 0).UTC(),
	}
}

func sampleTokens() *storage.Tokens {
	return &storage.Tokens{Generation: 1, RefreshToken: refresh, AccessToken: access, TokenType: "Bearer",
		AccessTokenExpireTime: time.Unix(1700003600, 0).UTC(), IssueTime: time.Unix(1700000000, 0).UTC(), State: "ACTIVE"}
}

// store is what the contract covers; every Store implementation passes it.
type store interface {
	CreateConnection(ctx context.Context, c *storage.Connection, t *storage.Tokens) (*storage.Connection, error)
	GetConnection(ctx context.Context, name string) (*storage.Connection, error)
	ListConnections(ctx context.Context, prefix, after string, limit int) ([]*storage.Connection, error)
	UpdateConnection(ctx context.Context, c *storage.Connection, t *storage.Tokens) (*storage.Connection, error)
	DeleteConnection(ctx context.Context, name string, revision int64) error
	GetTokens(ctx context.Context, name string) (*storage.Tokens, error)
	PutTokens(ctx context.Context, name string, t *storage.Tokens) error
	LoadAll(ctx context.Context, fn func(*storage.Connection, *storage.Tokens) error) error
}

// TestContract is the Store contract, run against every implementation:
// create, read, list, update with revisions, tokens, load, delete.
func TestContract(t *testing.T) {
	t.Run("bolt", func(t *testing.T) {
		runContract(t, openStore(t, filepath.Join(t.TempDir(), "db"), keyring(t, key(1))))
	})
	t.Run("etcd", func(t *testing.T) {
		runContract(t, openEtcd(t, etcdtest.Client(t, etcdtest.Start(t)), keyring(t, key(1))))
	})
}

func openEtcd(t *testing.T, cli *clientv3.Client, k *storage.Keyring) *storage.EtcdStore {
	t.Helper()
	s, err := storage.OpenEtcd(context.Background(), storage.EtcdOptions{Client: cli, Keyring: k})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { s.Close() })
	return s
}

func runContract(t *testing.T, s store) {
	ctx := context.Background()
	c, err := s.CreateConnection(ctx, sampleConn("tenants/a/connections/x"), sampleTokens())
	if err != nil || c.Revision != 1 {
		t.Fatalf("create: rev %v err %v", c, err)
	}
	if _, err := s.CreateConnection(ctx, sampleConn("tenants/a/connections/x"), nil); !errors.Is(err, storage.ErrAlreadyExists) {
		t.Errorf("second create: %v, want ErrAlreadyExists", err)
	}
	got, err := s.GetConnection(ctx, c.Name)
	if err != nil {
		t.Fatal(err)
	}
	if diff := cmp.Diff(got, c); diff != "" {
		t.Errorf("get (-got +want):\n%s", diff)
	}
	tok, err := s.GetTokens(ctx, c.Name)
	if err != nil {
		t.Fatal(err)
	}
	if diff := cmp.Diff(tok, sampleTokens()); diff != "" {
		t.Errorf("tokens (-got +want):\n%s", diff)
	}
	for _, n := range []string{"tenants/a/connections/y", "tenants/b/connections/x", "tenants/ab/connections/z"} {
		if _, err := s.CreateConnection(ctx, sampleConn(n), nil); err != nil {
			t.Fatal(err)
		}
	}
	for _, tc := range []struct {
		prefix, after string
		limit         int
		want          []string
	}{
		{"tenants/a/connections/", "", 10, []string{"tenants/a/connections/x", "tenants/a/connections/y"}},
		{"tenants/", "", 2, []string{"tenants/a/connections/x", "tenants/a/connections/y"}},
		{"tenants/", "tenants/a/connections/y", 10, []string{"tenants/ab/connections/z", "tenants/b/connections/x"}},
		{"tenants/c/connections/", "", 10, nil},
	} {
		list, err := s.ListConnections(ctx, tc.prefix, tc.after, tc.limit)
		if err != nil {
			t.Fatal(err)
		}
		var names []string
		for _, c := range list {
			names = append(names, c.Name)
		}
		if diff := cmp.Diff(names, tc.want); diff != "" {
			t.Errorf("list %q after %q (-got +want):\n%s", tc.prefix, tc.after, diff)
		}
	}
	upd := got.Clone()
	upd.DisplayName = "new"
	u, err := s.UpdateConnection(ctx, upd, nil)
	if err != nil || u.Revision != 2 {
		t.Fatalf("update: %v %v", u, err)
	}
	if _, err := s.UpdateConnection(ctx, upd, nil); !errors.Is(err, storage.ErrConflict) {
		t.Errorf("stale update: %v, want ErrConflict", err)
	}
	var loaded []string
	var mu sync.Mutex
	if err := s.LoadAll(ctx, func(c *storage.Connection, tok *storage.Tokens) error {
		mu.Lock()
		defer mu.Unlock()
		loaded = append(loaded, c.Name)
		if c.Name == "tenants/a/connections/x" && (tok.RefreshToken != refresh || c.Password != password) {
			t.Errorf("LoadAll lost secrets of %s", c.Name)
		}
		return nil
	}); err != nil || len(loaded) != 4 {
		t.Errorf("LoadAll: %v %v", loaded, err)
	}
	if tok2, _ := s.GetTokens(ctx, c.Name); tok2.RefreshToken != refresh {
		t.Error("update without tokens changed tokens")
	}
	if err := s.DeleteConnection(ctx, c.Name, 1); !errors.Is(err, storage.ErrConflict) {
		t.Errorf("delete at stale revision: %v", err)
	}
	if err := s.DeleteConnection(ctx, c.Name, 2); err != nil {
		t.Fatal(err)
	}
	if _, err := s.GetTokens(ctx, c.Name); !errors.Is(err, storage.ErrNotFound) {
		t.Errorf("tokens after delete: %v", err)
	}
	if err := s.PutTokens(ctx, c.Name, sampleTokens()); !errors.Is(err, storage.ErrNotFound) {
		t.Errorf("PutTokens on deleted connection: %v, want ErrNotFound", err)
	}
}

func TestSecretsSealedAtRest(t *testing.T) {
	path := filepath.Join(t.TempDir(), "db")
	s := openStore(t, path, keyring(t, key(1)))
	if _, err := s.CreateConnection(context.Background(), sampleConn("tenants/a/connections/x"), sampleTokens()); err != nil {
		t.Fatal(err)
	}
	s.Close()
	raw, err := os.ReadFile(path)
	if err != nil {
		t.Fatal(err)
	}
	for _, sec := range []string{secret, password, refresh, access} {
		if bytes.Contains(raw, []byte(sec)) {
			t.Errorf("data file holds %q in plain text", sec[:10])
		}
	}
	if !bytes.Contains(raw, []byte("erp.example.com")) {
		t.Error("sanity: non-secret fields should be readable in the file")
	}
}

func TestSealedValueBoundToConnection(t *testing.T) {
	// Copy one connection's sealed record under another name: it must not open.
	path := filepath.Join(t.TempDir(), "db")
	k := keyring(t, key(1))
	s := openStore(t, path, k)
	if _, err := s.CreateConnection(context.Background(), sampleConn("tenants/a/connections/x"), sampleTokens()); err != nil {
		t.Fatal(err)
	}
	s.Close()
	db, err := bolt.Open(path, 0o600, nil)
	if err != nil {
		t.Fatal(err)
	}
	db.Update(func(tx *bolt.Tx) error {
		b := tx.Bucket([]byte("tokens"))
		v := b.Get([]byte("tenants/a/connections/x"))
		cb := tx.Bucket([]byte("connections"))
		cv := cb.Get([]byte("tenants/a/connections/x"))
		b.Put([]byte("tenants/a/connections/z"), append([]byte(nil), v...))
		return cb.Put([]byte("tenants/a/connections/z"), append([]byte(nil), cv...))
	})
	db.Close()
	s = openStore(t, path, k)
	if _, err := s.GetTokens(context.Background(), "tenants/a/connections/z"); !errors.Is(err, storage.ErrWrongKey) {
		t.Errorf("moved sealed token opened: %v", err)
	}
}

func TestKeyRotation(t *testing.T) {
	path := filepath.Join(t.TempDir(), "db")
	s := openStore(t, path, keyring(t, key(1)))
	if _, err := s.CreateConnection(context.Background(), sampleConn("tenants/a/connections/x"), sampleTokens()); err != nil {
		t.Fatal(err)
	}
	s.Close()
	// New key first, old key kept: old records open, new writes use the new key.
	s = openStore(t, path, keyring(t, key(2), key(1)))
	tok, err := s.GetTokens(context.Background(), "tenants/a/connections/x")
	if err != nil || tok.RefreshToken != refresh {
		t.Fatalf("old record under rotated keyring: %v", err)
	}
	if err := s.PutTokens(context.Background(), "tenants/a/connections/x", tok); err != nil {
		t.Fatal(err)
	}
}

func TestOpenRefusesWrongKeyWithoutChangingFile(t *testing.T) {
	path := filepath.Join(t.TempDir(), "db")
	s := openStore(t, path, keyring(t, key(1)))
	s.Close()
	before := fileSum(t, path)
	_, err := storage.Open(path, storage.Options{Keyring: keyring(t, key(9))})
	if !errors.Is(err, storage.ErrWrongKey) {
		t.Fatalf("err = %v, want ErrWrongKey", err)
	}
	if fileSum(t, path) != before {
		t.Error("file changed")
	}
}

func TestOpenRefusesCorruptAndForeignFiles(t *testing.T) {
	dir := t.TempDir()
	garbage := filepath.Join(dir, "garbage")
	os.WriteFile(garbage, bytes.Repeat([]byte("not a database "), 2000), 0o600)
	small := filepath.Join(dir, "small")
	os.WriteFile(small, []byte("hello"), 0o600)
	foreign := filepath.Join(dir, "foreign")
	db, err := bolt.Open(foreign, 0o600, nil)
	if err != nil {
		t.Fatal(err)
	}
	db.Update(func(tx *bolt.Tx) error { _, err := tx.CreateBucket([]byte("other-app")); return err })
	db.Close()
	for _, path := range []string{garbage, small, foreign} {
		t.Run(filepath.Base(path), func(t *testing.T) {
			before := fileSum(t, path)
			_, err := storage.Open(path, storage.Options{Keyring: keyring(t, key(1))})
			if !errors.Is(err, storage.ErrNotDataFile) {
				t.Fatalf("err = %v, want ErrNotDataFile", err)
			}
			if fileSum(t, path) != before {
				t.Error("file changed")
			}
		})
	}
}

func TestSecondOpenFailsFast(t *testing.T) {
	path := filepath.Join(t.TempDir(), "db")
	openStore(t, path, keyring(t, key(1)))
	start := time.Now()
	_, err := storage.Open(path, storage.Options{Keyring: keyring(t, key(1)), LockTimeout: 300 * time.Millisecond})
	if !errors.Is(err, storage.ErrInUse) {
		t.Fatalf("err = %v, want ErrInUse", err)
	}
	if d := time.Since(start); d > 5*time.Second {
		t.Errorf("took %v", d)
	}
}

func TestConcurrentWritesShareCommits(t *testing.T) {
	s := openStore(t, filepath.Join(t.TempDir(), "db"), keyring(t, key(1)))
	ctx := context.Background()
	const n = 200
	for i := range n {
		if _, err := s.CreateConnection(ctx, sampleConn(name(i)), nil); err != nil {
			t.Fatal(err)
		}
	}
	c0, w0 := s.CommitStats()
	var wg sync.WaitGroup
	for i := range n {
		wg.Add(1)
		go func() {
			defer wg.Done()
			if err := s.PutTokens(ctx, name(i), sampleTokens()); err != nil {
				t.Error(err)
			}
		}()
	}
	wg.Wait()
	c1, w1 := s.CommitStats()
	if w1-w0 != n {
		t.Fatalf("writes = %d, want %d", w1-w0, n)
	}
	if c1-c0 >= n {
		t.Errorf("%d concurrent writes took %d commits: no group commit", n, c1-c0)
	}
	t.Logf("%d writes in %d commits", n, c1-c0)
	for i := range n {
		if tok, err := s.GetTokens(ctx, name(i)); err != nil || tok.RefreshToken != refresh {
			t.Fatalf("write %d lost: %v", i, err)
		}
	}
}

func name(i int) string {
	return "tenants/t/connections/c" + string(rune('a'+i%26)) + string(rune('a'+i/26%26))
}

func fileSum(t *testing.T, path string) [32]byte {
	t.Helper()
	b, err := os.ReadFile(path)
	if err != nil {
		t.Fatal(err)
	}
	return sha256.Sum256(b)
}

func TestKeyFile(t *testing.T) {
	dir := t.TempDir()
	path := filepath.Join(dir, "k")
	k, generated, err := storage.LoadOrGenerateKeyFile(path)
	if err != nil || !generated {
		t.Fatalf("generate: %v %v", generated, err)
	}
	info, _ := os.Stat(path)
	if info.Mode().Perm() != 0o600 {
		t.Errorf("mode = %v, want 0600", info.Mode().Perm())
	}
	k2, generated, err := storage.LoadOrGenerateKeyFile(path)
	if err != nil || generated || k2.PrimaryID() != k.PrimaryID() {
		t.Errorf("reload: %v %v", generated, err)
	}
	for _, mode := range []os.FileMode{0o644, 0o604, 0o660, 0o620} {
		os.Chmod(path, mode)
		if _, err := storage.LoadKeyFile(path); err == nil {
			t.Errorf("key file of mode %v accepted", mode)
		}
	}
	// A Kubernetes Secret mounted with the pod's fsGroup.
	for _, mode := range []os.FileMode{0o440, 0o640, 0o400} {
		os.Chmod(path, mode)
		if _, err := storage.LoadKeyFile(path); err != nil {
			t.Errorf("key file of mode %v: %v", mode, err)
		}
	}
	if _, err := storage.ParseKeys([]byte("!!!notbase64")); err == nil || bytes.Contains([]byte(err.Error()), []byte("notbase64")) {
		t.Errorf("bad key: %v (must fail without echoing the line)", err)
	}
}

func TestEtcdRefusesWrongKeyAndSharesLocks(t *testing.T) {
	cli := etcdtest.Client(t, etcdtest.Start(t))
	a := openEtcd(t, cli, keyring(t, key(1)))
	if _, err := storage.OpenEtcd(context.Background(), storage.EtcdOptions{Client: cli, Keyring: keyring(t, key(9))}); !errors.Is(err, storage.ErrWrongKey) {
		t.Errorf("wrong key: %v", err)
	}
	b := openEtcd(t, cli, keyring(t, key(1)))
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
	gets *int64
	mu   *sync.Mutex
}

func (c countingKV) Get(ctx context.Context, key string, opts ...clientv3.OpOption) (*clientv3.GetResponse, error) {
	c.mu.Lock()
	*c.gets++
	c.mu.Unlock()
	return c.KV.Get(ctx, key, opts...)
}

// TestLoadAllPairsAcrossPages loads more connections than one etcd range
// read returns: every connection arrives with its own token state (or none,
// when it has none), and etcd is read in pages, not once per connection.
func TestLoadAllPairsAcrossPages(t *testing.T) {
	const n = 450 // more than two of the etcd store's 200-key pages
	var gets int64
	var mu sync.Mutex
	for _, tc := range []struct {
		name string
		open func(t *testing.T) store
	}{
		{"bolt", func(t *testing.T) store {
			return openStore(t, filepath.Join(t.TempDir(), "db"), keyring(t, key(1)))
		}},
		{"etcd", func(t *testing.T) store {
			cli := etcdtest.Client(t, etcdtest.Start(t))
			cli.KV = countingKV{KV: cli.KV, gets: &gets, mu: &mu}
			return openEtcd(t, cli, keyring(t, key(1)))
		}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			s := tc.open(t)
			ctx := context.Background()
			withTokens := func(i int) bool { return i%7 != 3 }
			for i := range n {
				name := fmt.Sprintf("tenants/t%03d/connections/erp", i)
				var tok *storage.Tokens
				if withTokens(i) {
					tok = sampleTokens()
					tok.RefreshToken = "rt-" + name
					tok.Generation = int64(i + 1)
				}
				if _, err := s.CreateConnection(ctx, sampleConn(name), tok); err != nil {
					t.Fatal(err)
				}
			}
			mu.Lock()
			gets = 0
			mu.Unlock()
			seen := map[string]bool{}
			var seenMu sync.Mutex
			err := s.LoadAll(ctx, func(c *storage.Connection, tok *storage.Tokens) error {
				var i int
				if _, err := fmt.Sscanf(c.Name, "tenants/t%03d/connections/erp", &i); err != nil {
					return err
				}
				switch {
				case withTokens(i) && (tok.RefreshToken != "rt-"+c.Name || tok.Generation != int64(i+1)):
					t.Errorf("%s loaded with tokens of generation %d", c.Name, tok.Generation)
				case !withTokens(i) && (tok.RefreshToken != "" || tok.Generation != 0):
					t.Errorf("%s has no tokens but loaded generation %d", c.Name, tok.Generation)
				}
				seenMu.Lock()
				seen[c.Name] = true
				seenMu.Unlock()
				return nil
			})
			if err != nil || len(seen) != n {
				t.Fatalf("LoadAll: %d of %d connections, %v", len(seen), n, err)
			}
			mu.Lock()
			defer mu.Unlock()
			if tc.name == "etcd" && gets > 12 {
				t.Errorf("LoadAll made %d etcd range reads for %d connections; want a few per page", gets, n)
			}
		})
	}
}

// TestEtcdLockFencesTokenWrites: replica A holds a connection's lock, its
// lease lapses (revoked here, as etcd does when A is paused or cut off for
// longer than the TTL) and replica B takes the lock and commits. A's late
// token writes are refused with ErrLockLost instead of overwriting B's, and
// A takes locks again on a new session once B lets go.
func TestEtcdLockFencesTokenWrites(t *testing.T) {
	ep := etcdtest.Start(t)
	cliA, cliB := etcdtest.Client(t, ep), etcdtest.Client(t, ep)
	a, b := openEtcd(t, cliA, keyring(t, key(1))), openEtcd(t, cliB, keyring(t, key(1)))
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
