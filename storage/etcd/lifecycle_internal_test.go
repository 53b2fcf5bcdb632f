package etcd

import (
	"context"
	"errors"
	"path/filepath"
	"strings"
	"testing"

	clientv3 "go.etcd.io/etcd/client/v3"

	"tokenbroker/storage"
	"tokenbroker/storage/bolt"
	"tokenbroker/storage/etcdtest"
	"tokenbroker/storage/storetest"
)

func open(t *testing.T, cli *clientv3.Client, prefix string, keys ...[]byte) *Store {
	t.Helper()
	s, err := Open(context.Background(), Options{Client: cli, Keyring: storetest.Keyring(t, keys...), Prefix: prefix})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { s.Close() })
	return s
}

// dump reads every key under prefix but the replicas' and locks'.
func dump(t *testing.T, cli *clientv3.Client, prefix string) map[string]string {
	t.Helper()
	resp, err := cli.Get(context.Background(), prefix, clientv3.WithPrefix())
	if err != nil {
		t.Fatal(err)
	}
	out := map[string]string{}
	for _, kv := range resp.Kvs {
		k := string(kv.Key)
		if !strings.HasPrefix(k, prefix+"replicas/") && !strings.HasPrefix(k, prefix+"locks/") {
			out[k] = string(kv.Value)
		}
	}
	return out
}

// backupOf writes a backup of CreateForLoad's connections, sealed with a.
func backupOf(t *testing.T, cli *clientv3.Client, a []byte) *bolt.Backup {
	t.Helper()
	src := open(t, cli, "/src/", a)
	storetest.CreateForLoad(t, src)
	path := filepath.Join(t.TempDir(), "backup.db")
	storetest.WriteBackup(t, src, path)
	storetest.CheckNoPlaintext(t, path)
	b, err := bolt.OpenBackup(path)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { b.Close() })
	return b
}

// A backup of an etcd store restores into another prefix whole, refused
// while a replica runs there, with the wrong key, or over existing names;
// a reseal pass interrupted and resumed retires the old key.
func TestEtcdBackupRestoreAndReseal(t *testing.T) {
	cli := etcdtest.Client(t, etcdtest.Start(t))
	ctx := context.Background()
	a, b := storetest.Key(1), storetest.Key(2)
	backup := backupOf(t, cli, a)
	opts := RestoreOptions{Client: cli, Prefix: "/dst/", Keyring: storetest.Keyring(t, a)}

	if _, err := Restore(ctx, backup, RestoreOptions{Client: cli, Prefix: "/wrong/", Keyring: storetest.Keyring(t, b)}); !errors.Is(err, storage.ErrWrongKey) {
		t.Errorf("wrong key: %v", err)
	}
	if d := dump(t, cli, "/wrong/"); len(d) != 0 {
		t.Errorf("a restore with the wrong key wrote %d keys", len(d))
	}
	running := open(t, cli, "/dst/", a)
	if _, err := Restore(ctx, backup, opts); err == nil || !strings.Contains(err.Error(), "stop them") {
		t.Errorf("restore while a replica runs: %v", err)
	}
	running.Close()
	if n, err := Restore(ctx, backup, opts); err != nil || n != storetest.LoadAllCount {
		t.Fatalf("restore: %d, %v", n, err)
	}
	if _, err := Restore(ctx, backup, opts); !errors.Is(err, storage.ErrAlreadyExists) {
		t.Errorf("second restore: %v, want ErrAlreadyExists", err)
	}
	dst := open(t, cli, "/dst/", b, a)
	storetest.CheckLoadAll(t, dst)
	storetest.CheckRestoredIntents(t, dst)

	old := open(t, cli, "/dst/", a, b) // still sealing with the old key
	reps, err := dst.Replicas(ctx)
	if err != nil || len(reps) != 2 {
		t.Fatalf("replicas: %v, %v", reps, err)
	}
	var sealing []string
	for _, r := range reps {
		sealing = append(sealing, r.KeyIDs[0])
	}
	if !strings.Contains(strings.Join(sealing, ","), storage.KeyID(a)) || !strings.Contains(strings.Join(sealing, ","), storage.KeyID(b)) {
		t.Errorf("replicas announce sealing keys %v, want both %s and %s", sealing, storage.KeyID(a), storage.KeyID(b))
	}
	old.Close()

	st, done := storetest.Reseal(t, dst, 40, 3)
	if done || st.Resealed == 0 {
		t.Fatalf("3 batches: %+v, done %v", st, done)
	}
	use, _ := dst.KeyUse(ctx)
	if use.Stale == 0 || use.ByKey[storage.KeyID(b)] != st.Resealed {
		t.Fatalf("after %d resealed: %+v", st.Resealed, use)
	}
	storetest.ResealUnderWrites(t, dst, 40)
	if use, _ := dst.KeyUse(ctx); use.Stale != 0 || use.ByKey[storage.KeyID(a)] != 0 {
		t.Fatalf("after the pass: %+v", use)
	}
	dst.Close()
	open(t, cli, "/dst/", b) // the meta record opens with the new key alone
}

// When a batch fails, the batches written before it are rolled back: the
// prefix holds what it held before, but for the write that made the
// batch fail. A key written since the restore wrote it is left alone and
// reported.
func TestEtcdRestoreRollsBack(t *testing.T) {
	cli := etcdtest.Client(t, etcdtest.Start(t))
	ctx := context.Background()
	a := storetest.Key(1)
	backup := backupOf(t, cli, a)
	pre := open(t, cli, "/pre/", a)
	for i := range 10 {
		if _, err := pre.CreateConnection(ctx, storetest.SampleConn(storetest.LoadName(i)), nil); err != nil {
			t.Fatal(err)
		}
	}
	if _, err := pre.CreateConnection(ctx, storetest.SampleConn("tenants/zz/connections/other"), nil); err != nil {
		t.Fatal(err)
	}
	pre.Close()
	before := dump(t, cli, "/pre/")
	intruder := "/pre/connections/" + storetest.LoadName(3*restoreBatch+1)

	opts := RestoreOptions{Client: cli, Prefix: "/pre/", Keyring: storetest.Keyring(t, a), Replace: true}
	opts.beforeBatch = func(i int) {
		if i == 3 {
			cli.Put(ctx, intruder, "written meanwhile")
		}
	}
	_, err := Restore(ctx, backup, opts)
	if err == nil || !strings.Contains(err.Error(), "rolled back, nothing left written") {
		t.Fatalf("restore with a conflict in batch 3: %v", err)
	}
	after := dump(t, cli, "/pre/")
	before[intruder] = "written meanwhile"
	if len(after) != len(before) {
		t.Errorf("%d keys after the rollback, want %d", len(after), len(before))
	}
	for k, v := range before {
		if after[k] != v {
			t.Errorf("%s not rolled back", k)
		}
	}

	// A key changed after the restore wrote it is not rolled back over.
	changed := "/pre/connections/" + storetest.LoadName(restoreBatch+1)
	opts.beforeBatch = func(i int) {
		if i == 3 {
			cli.Put(ctx, changed, "changed after the restore wrote it")
			cli.Put(ctx, intruder, "written meanwhile, again")
		}
	}
	_, err = Restore(ctx, backup, opts)
	if err == nil || !strings.Contains(err.Error(), "1 keys could not be rolled back") || !strings.Contains(err.Error(), changed) {
		t.Fatalf("restore whose written key changed: %v", err)
	}
	if v := dump(t, cli, "/pre/")[changed]; v != "changed after the restore wrote it" {
		t.Errorf("%s = %q: the rollback overwrote a later write", changed, v)
	}
}
