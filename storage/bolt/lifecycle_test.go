package bolt_test

import (
	"context"
	"crypto/sha256"
	"errors"
	"os"
	"path/filepath"
	"testing"

	"tokenbroker/storage"
	"tokenbroker/storage/bolt"
	"tokenbroker/storage/storetest"
)

func openBackup(t *testing.T, path string) *bolt.Backup {
	t.Helper()
	b, err := bolt.OpenBackup(path)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { b.Close() })
	return b
}

// A backup holds every connection sealed; restored into a new file it
// loads back whole, every chain marked as possibly spent.
func TestBackupAndRestore(t *testing.T) {
	dir := t.TempDir()
	a := keyring(t, key(1))
	s := openStore(t, filepath.Join(dir, "src.db"), a)
	storetest.CreateForLoad(t, s)
	backup := filepath.Join(dir, "backup.db")
	if n := storetest.WriteBackup(t, s, backup); n != storetest.LoadAllCount {
		t.Fatalf("backup holds %d connections", n)
	}
	storetest.CheckNoPlaintext(t, backup)
	b := openBackup(t, backup)
	if n, err := b.Verify(a); err != nil || n != storetest.LoadAllCount {
		t.Fatalf("verify: %d, %v", n, err)
	}
	target := filepath.Join(dir, "restored", "tokenbroker.db")
	os.MkdirAll(filepath.Dir(target), 0o700)
	if n, err := bolt.Restore(target, b, bolt.RestoreOptions{Keyring: a}); err != nil || n != storetest.LoadAllCount {
		t.Fatalf("restore: %d, %v", n, err)
	}
	r := openStore(t, target, a)
	storetest.CheckLoadAll(t, r)
	storetest.CheckRestoredIntents(t, r)

	// Restored with a newer key first, the backup leaves nothing sealed
	// with the old one.
	rotated := filepath.Join(dir, "rotated", "tokenbroker.db")
	os.MkdirAll(filepath.Dir(rotated), 0o700)
	ba := keyring(t, key(2), key(1))
	if _, err := bolt.Restore(rotated, b, bolt.RestoreOptions{Keyring: ba}); err != nil {
		t.Fatal(err)
	}
	if use, err := openStore(t, rotated, ba).KeyUse(context.Background()); err != nil || use.Stale != 0 {
		t.Errorf("restored with a new first key: %+v, %v; want nothing sealed with the old key", use, err)
	}
}

// A restore with the wrong key, into a data file that exists, or into one
// a broker holds, is refused and changes nothing.
func TestRestoreRefusals(t *testing.T) {
	dir := t.TempDir()
	a := keyring(t, key(1))
	s := openStore(t, filepath.Join(dir, "src.db"), a)
	storetest.CreateForLoad(t, s)
	backup := filepath.Join(dir, "backup.db")
	storetest.WriteBackup(t, s, backup)
	b := openBackup(t, backup)

	fresh := filepath.Join(dir, "fresh.db")
	if _, err := bolt.Restore(fresh, b, bolt.RestoreOptions{Keyring: keyring(t, key(2))}); !errors.Is(err, storage.ErrWrongKey) {
		t.Errorf("wrong key: %v, want ErrWrongKey", err)
	}
	if _, err := os.Stat(fresh); !errors.Is(err, os.ErrNotExist) {
		t.Errorf("a restore with the wrong key created %s (%v)", fresh, err)
	}

	used := filepath.Join(dir, "used.db")
	if _, err := bolt.Restore(used, b, bolt.RestoreOptions{Keyring: a}); err != nil {
		t.Fatal(err)
	}
	before := fileHash(t, used)
	if _, err := bolt.Restore(used, b, bolt.RestoreOptions{Keyring: a}); !errors.Is(err, bolt.ErrNotEmpty) {
		t.Errorf("second restore: %v, want ErrNotEmpty", err)
	}
	if _, err := bolt.Restore(used, b, bolt.RestoreOptions{Keyring: keyring(t, key(2)), Replace: true}); !errors.Is(err, storage.ErrWrongKey) {
		t.Errorf("replace with the wrong key: %v, want ErrWrongKey", err)
	}
	if fileHash(t, used) != before {
		t.Error("a refused restore changed the data file")
	}
	held := openStore(t, used, a)
	if _, err := bolt.Restore(used, b, bolt.RestoreOptions{Keyring: a, Replace: true}); !errors.Is(err, storage.ErrInUse) {
		t.Errorf("restore into a held file: %v, want ErrInUse", err)
	}
	held.Close()
	if _, err := bolt.Restore(used, b, bolt.RestoreOptions{Keyring: a, Replace: true}); err != nil {
		t.Errorf("replace: %v", err)
	}
}

// A reseal pass interrupted half-way goes on where records are still
// stale; once done the old key opens nothing that is left, and the file
// opens without it.
func TestResealResumesAndRetiresTheOldKey(t *testing.T) {
	path := filepath.Join(t.TempDir(), "tokenbroker.db")
	a, b := key(1), key(2)
	s := openStore(t, path, keyring(t, a))
	storetest.CreateForLoad(t, s)
	s.Close()

	s = openStore(t, path, keyring(t, b, a))
	use, err := s.KeyUse(context.Background())
	all := use.Stale // the meta record, every connection, every token chain with a token
	if err != nil || all <= storetest.LoadAllCount || use.ByKey[storage.KeyID(a)] != all {
		t.Fatalf("before: %+v, %v", use, err)
	}
	st, done := storetest.Reseal(t, s, 50, 3)
	half := st.Resealed
	if done || half < 150 || half > 160 {
		t.Fatalf("3 batches of about 50: %+v, done %v", st, done)
	}
	s.Close() // interrupted

	s = openStore(t, path, keyring(t, b, a))
	// The store reseals its meta record when it opens: one more on the new key.
	if use, _ := s.KeyUse(context.Background()); use.Stale != all-half || use.ByKey[storage.KeyID(b)] != half+1 {
		t.Fatalf("after %d resealed: %+v", half, use)
	}
	st, done = storetest.Reseal(t, s, 50, -1)
	if !done || st.Resealed != all-half {
		t.Fatalf("resumed pass: %+v, done %v", st, done)
	}
	if use, _ := s.KeyUse(context.Background()); use.Stale != 0 || use.ByKey[storage.KeyID(a)] != 0 {
		t.Fatalf("after the pass: %+v", use)
	}
	s.Close()
	storetest.CheckLoadAll(t, openStore(t, path, keyring(t, b)))
}

// Resealing while tokens are written loses no write.
func TestResealUnderWrites(t *testing.T) {
	path := filepath.Join(t.TempDir(), "tokenbroker.db")
	s := openStore(t, path, keyring(t, key(1)))
	storetest.CreateForLoad(t, s)
	s.Close()
	s = openStore(t, path, keyring(t, key(2), key(1)))
	storetest.ResealUnderWrites(t, s, 20)
	if use, _ := s.KeyUse(context.Background()); use.Stale != 0 {
		t.Errorf("after the pass: %+v", use)
	}
}

func fileHash(t *testing.T, path string) [32]byte {
	t.Helper()
	b, err := os.ReadFile(path)
	if err != nil {
		t.Fatal(err)
	}
	return sha256.Sum256(b)
}
