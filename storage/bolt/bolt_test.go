package bolt_test

import (
	"bytes"
	"context"
	"errors"
	"os"
	"path/filepath"
	"sync"
	"testing"
	"time"

	bbolt "go.etcd.io/bbolt"

	"tokenbroker/internal/testkit"
	"tokenbroker/storage"
	"tokenbroker/storage/bolt"
	"tokenbroker/storage/storetest"
)

var (
	key         = storetest.Key
	keyring     = storetest.Keyring
	sampleConn  = storetest.SampleConn
	sampleToken = storetest.SampleTokens
)

func openStore(t *testing.T, path string, k *storage.Keyring) *bolt.Store {
	t.Helper()
	s, err := bolt.Open(path, bolt.Options{Keyring: k, LockTimeout: 200 * time.Millisecond})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { s.Close() })
	return s
}

// TestContract runs the store contract against a bbolt file.
func TestContract(t *testing.T) {
	storetest.Run(t, func(t *testing.T) storetest.Store {
		return openStore(t, filepath.Join(t.TempDir(), "db"), keyring(t, key(1)))
	})
}

func TestSecretsSealedAtRest(t *testing.T) {
	path := filepath.Join(t.TempDir(), "db")
	s := openStore(t, path, keyring(t, key(1)))
	if _, err := s.CreateConnection(context.Background(), sampleConn("tenants/a/connections/x"), sampleToken()); err != nil {
		t.Fatal(err)
	}
	s.Close()
	raw, err := os.ReadFile(path)
	if err != nil {
		t.Fatal(err)
	}
	for _, sec := range []string{storetest.Secret, storetest.Password, storetest.Refresh, storetest.Access} {
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
	if _, err := s.CreateConnection(context.Background(), sampleConn("tenants/a/connections/x"), sampleToken()); err != nil {
		t.Fatal(err)
	}
	s.Close()
	db, err := bbolt.Open(path, 0o600, nil)
	if err != nil {
		t.Fatal(err)
	}
	db.Update(func(tx *bbolt.Tx) error {
		b := tx.Bucket([]byte("tokens"))
		v := b.Get([]byte("tenants/a/connections/x"))
		cb := tx.Bucket([]byte("connections"))
		cv := cb.Get([]byte("tenants/a/connections/x"))
		b.Put([]byte("tenants/a/connections/z"), append([]byte(nil), v...))
		return cb.Put([]byte("tenants/a/connections/z"), append([]byte(nil), cv...))
	})
	db.Close()
	s = openStore(t, path, k)
	if _, err := s.GetTokens(context.Background(), "tenants/a/connections/z"); !errors.Is(err, storage.ErrTampered) {
		t.Errorf("moved sealed token opened: %v", err)
	}
}

func TestKeyRotation(t *testing.T) {
	path := filepath.Join(t.TempDir(), "db")
	s := openStore(t, path, keyring(t, key(1)))
	if _, err := s.CreateConnection(context.Background(), sampleConn("tenants/a/connections/x"), sampleToken()); err != nil {
		t.Fatal(err)
	}
	s.Close()
	// New key first, old key kept: old records open, new writes use the new key.
	s = openStore(t, path, keyring(t, key(2), key(1)))
	tok, err := s.GetTokens(context.Background(), "tenants/a/connections/x")
	if err != nil || tok.RefreshToken != storetest.Refresh {
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
	before := testkit.FileSum(t, path)
	_, err := bolt.Open(path, bolt.Options{Keyring: keyring(t, key(9))})
	if !errors.Is(err, storage.ErrWrongKey) {
		t.Fatalf("err = %v, want ErrWrongKey", err)
	}
	if testkit.FileSum(t, path) != before {
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
	db, err := bbolt.Open(foreign, 0o600, nil)
	if err != nil {
		t.Fatal(err)
	}
	db.Update(func(tx *bbolt.Tx) error { _, err := tx.CreateBucket([]byte("other-app")); return err })
	db.Close()
	for _, path := range []string{garbage, small, foreign} {
		t.Run(filepath.Base(path), func(t *testing.T) {
			before := testkit.FileSum(t, path)
			_, err := bolt.Open(path, bolt.Options{Keyring: keyring(t, key(1))})
			if !errors.Is(err, storage.ErrNotDataFile) {
				t.Fatalf("err = %v, want ErrNotDataFile", err)
			}
			if testkit.FileSum(t, path) != before {
				t.Error("file changed")
			}
		})
	}
}

func TestSecondOpenFailsFast(t *testing.T) {
	path := filepath.Join(t.TempDir(), "db")
	openStore(t, path, keyring(t, key(1)))
	start := time.Now()
	_, err := bolt.Open(path, bolt.Options{Keyring: keyring(t, key(1)), LockTimeout: 300 * time.Millisecond})
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
			if err := s.PutTokens(ctx, name(i), sampleToken()); err != nil {
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
		if tok, err := s.GetTokens(ctx, name(i)); err != nil || tok.RefreshToken != storetest.Refresh {
			t.Fatalf("write %d lost: %v", i, err)
		}
	}
}

func name(i int) string {
	return "tenants/t/connections/c" + string(rune('a'+i%26)) + string(rune('a'+i/26%26))
}

// TestWriteAfterCloseFailsInsteadOfHanging: a write that races Close (a
// shared refresh finishing while the process stops) answers ErrClosed; it
// never waits for a committer that has already gone.
func TestWriteAfterCloseFailsInsteadOfHanging(t *testing.T) {
	s := openStore(t, filepath.Join(t.TempDir(), "db"), keyring(t, key(1)))
	ctx := context.Background()
	if _, err := s.CreateConnection(ctx, sampleConn(name(0)), nil); err != nil {
		t.Fatal(err)
	}
	s.Close()
	done := make(chan error, 100)
	go func() {
		for range 100 {
			done <- s.PutTokens(ctx, name(0), sampleToken())
		}
	}()
	for i := range 100 {
		select {
		case err := <-done:
			if !errors.Is(err, storage.ErrClosed) {
				t.Fatalf("write %d after Close: err = %v, want ErrClosed", i, err)
			}
		case <-time.After(10 * time.Second):
			t.Fatalf("write %d after Close still waiting after 10 s", i)
		}
	}
}
