package etcd_test

import (
	"bytes"
	"context"
	"errors"
	"os"
	"path/filepath"
	"strings"
	"testing"

	bbolt "go.etcd.io/bbolt"
	"go.etcd.io/etcd/api/v3/v3rpc/rpctypes"
	clientv3 "go.etcd.io/etcd/client/v3"
	"google.golang.org/protobuf/proto"

	storagev1 "tokenbroker/gen/tokenbroker/storage/v1"

	"tokenbroker/storage"
	"tokenbroker/storage/etcdtest"
	"tokenbroker/storage/storetest"
)

const victim = "tenants/a/connections/x"

// rewriteValue replaces old with new in the value at key through a raw
// client, as someone with write access to etcd but not the data key would.
func rewriteValue(t *testing.T, cli *clientv3.Client, key, old, new string) {
	t.Helper()
	resp, err := cli.Get(context.Background(), key)
	if err != nil || len(resp.Kvs) != 1 {
		t.Fatalf("get %s: %v", key, err)
	}
	v := string(resp.Kvs[0].Value)
	if !strings.Contains(v, old) {
		t.Fatalf("%s does not hold %q", key, old)
	}
	if _, err := cli.Put(context.Background(), key, strings.ReplaceAll(v, old, new)); err != nil {
		t.Fatal(err)
	}
}

func TestRewrittenInstanceURLIsRefused(t *testing.T) {
	cli := etcdtest.Client(t, etcdtest.Start(t))
	ctx := context.Background()
	k := keyring(t, key(1))
	s := openStore(t, cli, k, "/p/")
	if _, err := s.CreateConnection(ctx, sampleConn(victim), sampleTokens()); err != nil {
		t.Fatal(err)
	}
	rewriteValue(t, cli, "/p/connections/"+victim, "https://erp.example.com", "https://evl.example.com")
	// A write that reseals nothing must not vouch for the rewritten bytes.
	if err := s.PutTokens(ctx, victim, sampleTokens()); err != nil {
		t.Fatal(err)
	}
	s2 := openStore(t, cli, k, "/p/")
	for _, st := range []interface {
		GetConnection(context.Context, string) (*storage.Connection, error)
	}{s, s2} {
		if _, err := st.GetConnection(ctx, victim); !errors.Is(err, storage.ErrTampered) || !strings.Contains(err.Error(), victim) {
			t.Errorf("get: %v; want ErrTampered naming %s", err, victim)
		}
	}
	err := s2.LoadAll(ctx, func(*storage.Connection, *storage.Tokens) error { return nil })
	if !errors.Is(err, storage.ErrTampered) || !strings.Contains(err.Error(), victim) {
		t.Errorf("load all: %v; want ErrTampered naming %s", err, victim)
	}
	if _, err := s2.ListConnections(ctx, "tenants/", "", 10); !errors.Is(err, storage.ErrTampered) {
		t.Errorf("list: %v; want ErrTampered", err)
	}
}

// fixture reads a value of the data file of format 1 in storage/bolt's
// testdata, written by the version before records were authenticated.
func fixture(t *testing.T, bucket, key string) string {
	t.Helper()
	if _, err := os.Stat("../bolt/testdata/format1.db"); err != nil {
		t.Fatal(err)
	}
	db, err := bbolt.Open("../bolt/testdata/format1.db", 0o600, &bbolt.Options{ReadOnly: true})
	if err != nil {
		t.Fatal(err)
	}
	defer db.Close()
	var v []byte
	db.View(func(tx *bbolt.Tx) error { v = bytes.Clone(tx.Bucket([]byte(bucket)).Get([]byte(key))); return nil })
	return string(v)
}

// TestFormat1IsUpgradedOnce stores records of format 1 under a prefix, as
// the earlier version did: they open, come out authenticated, and from then
// on a record without its seal is refused.
func TestFormat1IsUpgradedOnce(t *testing.T) {
	cli := etcdtest.Client(t, etcdtest.Start(t))
	ctx := context.Background()
	for _, kv := range [][3]string{
		{"/p/meta", "meta", "meta"},
		{"/p/connections/" + victim, "connections", victim},
		{"/p/tokens/" + victim, "tokens", victim},
	} {
		if _, err := cli.Put(ctx, kv[0], fixture(t, kv[1], kv[2])); err != nil {
			t.Fatal(err)
		}
	}
	k := keyring(t, key(1))
	s := openStore(t, cli, k, "/p/")
	if s.Upgraded() != 2 {
		t.Errorf("upgraded %d records, want 2", s.Upgraded())
	}
	if tok, err := s.GetTokens(ctx, victim); err != nil || tok.RefreshToken != storetest.Refresh {
		t.Fatalf("upgraded tokens: %v", err)
	}
	if s := openStore(t, cli, k, "/p/"); s.Upgraded() != 0 {
		t.Errorf("second open upgraded %d records again", s.Upgraded())
	}
	if _, err := cli.Put(ctx, "/p/connections/"+victim, fixture(t, "connections", victim)); err != nil {
		t.Fatal(err)
	}
	if _, err := s.GetConnection(ctx, victim); !errors.Is(err, storage.ErrTampered) {
		t.Errorf("a record without its seal after the upgrade: %v; want ErrTampered", err)
	}
}

func TestRotationResealsOnTokenCommit(t *testing.T) {
	cli := etcdtest.Client(t, etcdtest.Start(t))
	ctx := context.Background()
	s := openStore(t, cli, keyring(t, key(1)), "/p/")
	if _, err := s.CreateConnection(ctx, sampleConn(victim), sampleTokens()); err != nil {
		t.Fatal(err)
	}
	s = openStore(t, cli, keyring(t, key(2), key(1)), "/p/")
	if n, err := s.OldKeyRecords(ctx); err != nil || n != 2 {
		t.Errorf("records on the old key before: %d, %v; want 2", n, err)
	}
	if err := s.PutTokens(ctx, victim, sampleTokens()); err != nil {
		t.Fatal(err)
	}
	if n, err := s.OldKeyRecords(ctx); err != nil || n != 0 {
		t.Errorf("records on the old key after a token commit: %d, %v; want 0", n, err)
	}
	s = openStore(t, cli, keyring(t, key(2)), "/p/")
	c, err := s.GetConnection(ctx, victim)
	if err != nil || c.Password != storetest.Password {
		t.Fatalf("after the old key went: %v", err)
	}
}

// TestDeletedValuesLeaveHistoryAtCompaction checks what README says of a
// delete on etcd: the sealed values stay readable at earlier revisions
// until the cluster's history is compacted past the delete, and are out of
// the member's backend file once it is defragmented.
func TestDeletedValuesLeaveHistoryAtCompaction(t *testing.T) {
	dir := t.TempDir()
	endpoint, stop, err := etcdtest.Run(dir)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(stop)
	cli := etcdtest.Client(t, endpoint)
	ctx := context.Background()
	s := openStore(t, cli, keyring(t, key(1)), "/p/")
	if _, err := s.CreateConnection(ctx, sampleConn(victim), sampleTokens()); err != nil {
		t.Fatal(err)
	}
	if _, err := s.CreateConnection(ctx, sampleConn("tenants/b/connections/y"), sampleTokens()); err != nil {
		t.Fatal(err)
	}
	before, err := cli.Get(ctx, "/p/tokens/"+victim)
	if err != nil {
		t.Fatal(err)
	}
	live, err := cli.Get(ctx, "/p/tokens/tenants/b/connections/y")
	if err != nil {
		t.Fatal(err)
	}
	if err := s.DeleteConnection(ctx, victim, 0); err != nil {
		t.Fatal(err)
	}
	old, err := cli.Get(ctx, "/p/tokens/"+victim, clientv3.WithRev(before.Header.Revision))
	if err != nil || len(old.Kvs) != 1 {
		t.Fatalf("history before compaction: %v", err)
	}
	now, err := cli.Get(ctx, "/p/")
	if err != nil {
		t.Fatal(err)
	}
	if _, err := cli.Compact(ctx, now.Header.Revision, clientv3.WithCompactPhysical()); err != nil {
		t.Fatal(err)
	}
	if _, err := cli.Get(ctx, "/p/tokens/"+victim, clientv3.WithRev(before.Header.Revision)); !errors.Is(err, rpctypes.ErrCompacted) {
		t.Errorf("history after compaction: %v; want ErrCompacted", err)
	}
	if _, err := cli.Defragment(ctx, endpoint); err != nil {
		t.Fatal(err)
	}
	raw, err := os.ReadFile(filepath.Join(dir, "member", "snap", "db"))
	if err != nil {
		t.Fatal(err)
	}
	if !bytes.Contains(raw, live.Kvs[0].Value) {
		t.Fatal("sanity: the scan does not find the live connection's token record")
	}
	if bytes.Contains(raw, sealedAccess(t, before.Kvs[0].Value)) {
		t.Error("the deleted connection's sealed access token is in the backend file after defragmentation")
	}
}

// sealedAccess is the ciphertext of a stored token record's access token.
func sealedAccess(t *testing.T, v []byte) []byte {
	t.Helper()
	var r storagev1.TokenRecord
	if err := proto.Unmarshal(v, &r); err != nil || len(r.GetAccessToken().GetCiphertext()) == 0 {
		t.Fatalf("token record: %v", err)
	}
	return r.GetAccessToken().GetCiphertext()
}
