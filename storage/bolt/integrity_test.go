package bolt_test

import (
	"bytes"
	"context"
	"errors"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"testing"

	bbolt "go.etcd.io/bbolt"
	"google.golang.org/protobuf/proto"

	storagev1 "tokenbroker/gen/tokenbroker/storage/v1"
	"tokenbroker/storage"
	"tokenbroker/storage/bolt"
	"tokenbroker/storage/storetest"
)

const victim = "tenants/a/connections/x"

// rewrite replaces every occurrence of old in the file at path with new (of
// the same length), as someone with write access to the file but not the
// key would.
func rewrite(t *testing.T, path, old, new string) {
	t.Helper()
	if len(old) != len(new) {
		t.Fatalf("rewrite %q: lengths differ", old)
	}
	raw, err := os.ReadFile(path)
	if err != nil {
		t.Fatal(err)
	}
	if !bytes.Contains(raw, []byte(old)) {
		t.Fatalf("the file does not hold %q", old)
	}
	if err := os.WriteFile(path, bytes.ReplaceAll(raw, []byte(old), []byte(new)), 0o600); err != nil {
		t.Fatal(err)
	}
}

// checkRefused asserts that reading the victim's rewritten record (its
// tokens with tokens set) and loading all refuse it, naming it.
func checkRefused(t *testing.T, s *bolt.Store, tokens bool) {
	t.Helper()
	ctx := context.Background()
	var err error
	if tokens {
		_, err = s.GetTokens(ctx, victim)
	} else {
		_, err = s.GetConnection(ctx, victim)
	}
	if !errors.Is(err, storage.ErrTampered) || !strings.Contains(err.Error(), victim) {
		t.Errorf("read: %v; want ErrTampered naming %s", err, victim)
	}
	err = s.LoadAll(ctx, func(*storage.Connection, *storage.Tokens) error { return nil })
	if !errors.Is(err, storage.ErrTampered) || !strings.Contains(err.Error(), `"tenants/`) {
		t.Errorf("load all: %v; want ErrTampered naming the connection", err)
	}
	for _, sec := range []string{storetest.Secret, storetest.Password, storetest.Refresh, storetest.Access} {
		if err != nil && strings.Contains(err.Error(), sec) {
			t.Error("the refusal quotes a secret")
		}
	}
}

// TestRewrittenFieldsAreRefused rewrites, in the bytes of a real file, each
// field that steers where secrets go (and a token record's field): every
// read refuses the record.
func TestRewrittenFieldsAreRefused(t *testing.T) {
	for _, tc := range []struct{ field, old, new string }{
		{"instance_url", "https://erp.example.com", "https://evl.example.com"},
		{"client_id", "G@T", "E@T"},
		{"scopes", "offline_access", "offline_acce5s"},
		{"token_type", "Bearer", "Beare5"},
	} {
		t.Run(tc.field, func(t *testing.T) {
			path := filepath.Join(t.TempDir(), "db")
			k := keyring(t, key(1))
			s := openStore(t, path, k)
			if _, err := s.CreateConnection(context.Background(), sampleConn(victim), sampleToken()); err != nil {
				t.Fatal(err)
			}
			s.Close()
			rewrite(t, path, tc.old, tc.new)
			checkRefused(t, openStore(t, path, k), tc.field == "token_type")
		})
	}
}

// TestRecordWithoutSealIsRefused puts a record of format 1 (no record seal)
// into a file of the current format: it is not taken on trust.
func TestRecordWithoutSealIsRefused(t *testing.T) {
	path := filepath.Join(t.TempDir(), "db")
	k := keyring(t, key(1))
	s := openStore(t, path, k)
	if _, err := s.CreateConnection(context.Background(), sampleConn(victim), sampleToken()); err != nil {
		t.Fatal(err)
	}
	s.Close()
	old := rawValue(t, "testdata/format1.db", "connections", victim)
	db, err := bbolt.Open(path, 0o600, nil)
	if err != nil {
		t.Fatal(err)
	}
	db.Update(func(tx *bbolt.Tx) error { return tx.Bucket([]byte("connections")).Put([]byte(victim), old) })
	db.Close()
	checkRefused(t, openStore(t, path, k), false)
}

// TestFormat1FileIsUpgradedOnce opens a file written by the version before
// records were authenticated: it opens, every record comes out
// authenticated, and from then on a rewritten field is refused.
func TestFormat1FileIsUpgradedOnce(t *testing.T) {
	path := filepath.Join(t.TempDir(), "db")
	raw, err := os.ReadFile("testdata/format1.db")
	if err != nil {
		t.Fatal(err)
	}
	os.WriteFile(path, raw, 0o600)
	k := keyring(t, key(1))
	s := openStore(t, path, k)
	if s.Upgraded() != 4 {
		t.Errorf("upgraded %d records, want 4", s.Upgraded())
	}
	c, err := s.GetConnection(context.Background(), victim)
	if err != nil || c.ClientSecret != storetest.Secret || c.InstanceURL != "https://erp.example.com" {
		t.Fatalf("upgraded record: %v", err)
	}
	if tok, err := s.GetTokens(context.Background(), victim); err != nil || tok.RefreshToken != storetest.Refresh {
		t.Fatalf("upgraded tokens: %v", err)
	}
	s.Close()
	if s := openStore(t, path, k); s.Upgraded() != 0 {
		t.Errorf("second open upgraded %d records again", s.Upgraded())
	} else {
		s.Close()
	}
	rewrite(t, path, "https://erp.example.com", "https://evl.example.com")
	checkRefused(t, openStore(t, path, k), false)
}

// TestRotationResealsOnTokenCommit follows a key rotation: with the new key
// first, one token commit per connection moves the connection's secrets
// too, and the canary moves at the restart, so the old key can go.
func TestRotationResealsOnTokenCommit(t *testing.T) {
	path := filepath.Join(t.TempDir(), "db")
	ctx := context.Background()
	s := openStore(t, path, keyring(t, key(1)))
	if _, err := s.CreateConnection(ctx, sampleConn(victim), sampleToken()); err != nil {
		t.Fatal(err)
	}
	if _, err := s.CreateConnection(ctx, sampleConn("tenants/b/connections/y"), sampleToken()); err != nil {
		t.Fatal(err)
	}
	s.Close()
	s = openStore(t, path, keyring(t, key(2), key(1)))
	if n, err := s.OldKeyRecords(ctx); err != nil || n != 4 {
		t.Errorf("records on the old key before: %d, %v; want 4", n, err)
	}
	if err := s.PutTokens(ctx, victim, sampleToken()); err != nil {
		t.Fatal(err)
	}
	// The other connection's configuration changes without new tokens:
	// its token record moves along.
	c, err := s.GetConnection(ctx, "tenants/b/connections/y")
	if err != nil {
		t.Fatal(err)
	}
	if _, err := s.UpdateConnection(ctx, c, nil); err != nil {
		t.Fatal(err)
	}
	if n, err := s.OldKeyRecords(ctx); err != nil || n != 0 {
		t.Errorf("records on the old key after one write each: %d, %v; want 0", n, err)
	}
	s.Close()
	s = openStore(t, path, keyring(t, key(2)))
	for _, n := range []string{victim, "tenants/b/connections/y"} {
		c, err := s.GetConnection(ctx, n)
		if err != nil || c.Password != storetest.Password {
			t.Fatalf("%s after the old key went: %v", n, err)
		}
		if tok, err := s.GetTokens(ctx, n); err != nil || tok.AccessToken != storetest.Access {
			t.Fatalf("%s tokens after the old key went: %v", n, err)
		}
	}
}

// TestDeleteLeavesNoSealedBytes records every sealed value a connection
// ever had in the file, deletes it, and scans the file's raw bytes (free
// pages included) for any of them.
func TestDeleteLeavesNoSealedBytes(t *testing.T) {
	path := filepath.Join(t.TempDir(), "db")
	ctx := context.Background()
	k := keyring(t, key(1))
	s := openStore(t, path, k)
	if _, err := s.CreateConnection(ctx, sampleConn(victim), sampleToken()); err != nil {
		t.Fatal(err)
	}
	if _, err := s.CreateConnection(ctx, sampleConn("tenants/b/connections/y"), sampleToken()); err != nil {
		t.Fatal(err)
	}
	var sealed [][]byte
	for i := range 5 {
		s.Close()
		sealed = append(sealed, sealedValues(t, path, victim)...)
		s = openStore(t, path, k)
		tok := sampleToken()
		tok.Generation = int64(i + 2)
		if err := s.PutTokens(ctx, victim, tok); err != nil {
			t.Fatal(err)
		}
	}
	s.Close()
	sealed = append(sealed, sealedValues(t, path, victim)...)
	kept := sealedValues(t, path, "tenants/b/connections/y")
	s = openStore(t, path, k)
	if err := s.DeleteConnection(ctx, victim, 0); err != nil {
		t.Fatal(err)
	}
	// Read while the store holds the file: what is on disk once delete
	// answered.
	raw, err := os.ReadFile(path)
	if err != nil {
		t.Fatal(err)
	}
	found := 0
	for _, v := range sealed {
		if bytes.Contains(raw, v) {
			found++
		}
	}
	if found > 0 {
		t.Errorf("%d of the %d sealed values the deleted connection had are still in the file", found, len(sealed))
	}
	for _, v := range kept {
		if !bytes.Contains(raw, v) {
			t.Fatal("sanity: the scan does not find the live connection's sealed values")
		}
	}
	// The store goes on serving on the compacted file, which its file
	// identity check takes for its own.
	if err := s.Healthy(); err != nil {
		t.Errorf("health after the wipe: %v", err)
	}
	if c, err := s.GetConnection(ctx, "tenants/b/connections/y"); err != nil || c.ClientSecret != storetest.Secret {
		t.Fatalf("after the wipe: %v", err)
	}
	if err := s.PutTokens(ctx, "tenants/b/connections/y", sampleToken()); err != nil {
		t.Fatalf("write after the wipe: %v", err)
	}
}

// TestWipeWaitsForReaders deletes while many readers read: none fails.
func TestWipeWaitsForReaders(t *testing.T) {
	s := openStore(t, filepath.Join(t.TempDir(), "db"), keyring(t, key(1)))
	ctx := context.Background()
	for i := range 20 {
		if _, err := s.CreateConnection(ctx, sampleConn(name(i)), sampleToken()); err != nil {
			t.Fatal(err)
		}
	}
	stop := make(chan struct{})
	var wg sync.WaitGroup
	var reads, failures sync.Map
	for r := range 8 {
		wg.Add(1)
		go func() {
			defer wg.Done()
			n := 0
			for {
				select {
				case <-stop:
					reads.Store(r, n)
					return
				default:
				}
				if _, err := s.GetConnection(ctx, name(19)); err != nil {
					failures.Store(r, err)
				}
				n++
			}
		}()
	}
	for i := range 10 {
		if err := s.DeleteConnection(ctx, name(i), 0); err != nil {
			t.Fatal(err)
		}
	}
	close(stop)
	wg.Wait()
	failures.Range(func(_, v any) bool { t.Errorf("read during wipes: %v", v); return false })
	list, err := s.ListConnections(ctx, "tenants/", "", 100)
	if err != nil || len(list) != 10 {
		t.Errorf("after 10 deletes: %d connections, %v; want 10", len(list), err)
	}
}

// rawValue reads one stored value from a closed file.
func rawValue(t *testing.T, path, bucket, key string) []byte {
	t.Helper()
	db, err := bbolt.Open(path, 0o600, &bbolt.Options{ReadOnly: true})
	if err != nil {
		t.Fatal(err)
	}
	defer db.Close()
	var v []byte
	db.View(func(tx *bbolt.Tx) error {
		v = bytes.Clone(tx.Bucket([]byte(bucket)).Get([]byte(key)))
		return nil
	})
	if v == nil {
		t.Fatalf("%s has no %s/%s", path, bucket, key)
	}
	return v
}

// sealedValues returns the ciphertexts of every sealed field the
// connection's records hold now.
func sealedValues(t *testing.T, path, name string) [][]byte {
	t.Helper()
	var c storagev1.ConnectionRecord
	var tk storagev1.TokenRecord
	if err := proto.Unmarshal(rawValue(t, path, "connections", name), &c); err != nil {
		t.Fatal(err)
	}
	if err := proto.Unmarshal(rawValue(t, path, "tokens", name), &tk); err != nil {
		t.Fatal(err)
	}
	var out [][]byte
	for _, s := range []*storagev1.Sealed{c.GetClientSecret(), c.GetPassword(), tk.GetRefreshToken(), tk.GetAccessToken()} {
		out = append(out, s.GetCiphertext())
	}
	return out
}

// TestInterruptedWipeRunsAtOpen makes the file a crash leaves between an
// erase's commit and its wipe (the records gone, their bytes in free pages,
// the erase's wipe mark set): the next open wipes it.
func TestInterruptedWipeRunsAtOpen(t *testing.T) {
	path := filepath.Join(t.TempDir(), "db")
	ctx := context.Background()
	k := keyring(t, key(1))
	s := openStore(t, path, k)
	for _, n := range []string{victim, "tenants/b/connections/y"} {
		if _, err := s.CreateConnection(ctx, sampleConn(n), sampleToken()); err != nil {
			t.Fatal(err)
		}
	}
	s.Close()
	sealed := sealedValues(t, path, victim)
	db, err := bbolt.Open(path, 0o600, nil)
	if err != nil {
		t.Fatal(err)
	}
	err = db.Update(func(tx *bbolt.Tx) error {
		tx.Bucket([]byte("connections")).Delete([]byte(victim))
		tx.Bucket([]byte("tokens")).Delete([]byte(victim))
		return tx.Bucket([]byte("meta")).Put([]byte("wipe"), []byte{1})
	})
	db.Close()
	if err != nil {
		t.Fatal(err)
	}
	if raw, _ := os.ReadFile(path); !containsAny(raw, sealed) {
		t.Fatal("sanity: the erased records' bytes are not in the file before the open")
	}
	s = openStore(t, path, k)
	raw, err := os.ReadFile(path)
	if err != nil {
		t.Fatal(err)
	}
	if containsAny(raw, sealed) {
		t.Error("the open did not wipe the erased records' bytes")
	}
	if c, err := s.GetConnection(ctx, "tenants/b/connections/y"); err != nil || c.Password != storetest.Password {
		t.Fatalf("the live connection after the wipe: %v", err)
	}
	s.Close()
	db, err = bbolt.Open(path, 0o600, &bbolt.Options{ReadOnly: true})
	if err != nil {
		t.Fatal(err)
	}
	defer db.Close()
	db.View(func(tx *bbolt.Tx) error {
		if tx.Bucket([]byte("meta")).Get([]byte("wipe")) != nil {
			t.Error("the wipe mark outlived the wipe")
		}
		return nil
	})
}

func containsAny(raw []byte, vs [][]byte) bool {
	for _, v := range vs {
		if bytes.Contains(raw, v) {
			return true
		}
	}
	return false
}
