package bolt_test

import (
	"errors"
	"os"
	"os/signal"
	"path/filepath"
	"syscall"
	"testing"

	"tokenbroker/storage/bolt"
	"tokenbroker/storage/storetest"
)

// limitFileSize makes every write of this process past max bytes of a
// file fail (EFBIG), as a full disk or a quota does, until the test ends.
func limitFileSize(t *testing.T, max uint64) {
	t.Helper()
	var was syscall.Rlimit
	if err := syscall.Getrlimit(syscall.RLIMIT_FSIZE, &was); err != nil {
		t.Fatal(err)
	}
	signal.Ignore(syscall.SIGXFSZ) // the write fails instead
	lim := was
	lim.Cur = max
	if err := syscall.Setrlimit(syscall.RLIMIT_FSIZE, &lim); err != nil {
		t.Skipf("cannot limit the file size: %v", err)
	}
	t.Cleanup(func() {
		if err := syscall.Setrlimit(syscall.RLIMIT_FSIZE, &was); err != nil {
			t.Errorf("restoring the file size limit: %v", err)
		}
		signal.Reset(syscall.SIGXFSZ)
	})
}

// TestRestoreFailingHalfWayLeavesNothing makes a restore's writes fail
// once the file it writes passes 64 KiB, well into the records: a new
// target is not created, a replaced one is left as it was, and no
// temporary file stays behind.
func TestRestoreFailingHalfWayLeavesNothing(t *testing.T) {
	dir := t.TempDir()
	a := keyring(t, key(1))
	s := openStore(t, filepath.Join(dir, "src.db"), a)
	storetest.CreateForLoad(t, s)
	backup := filepath.Join(dir, "backup.db")
	storetest.WriteBackup(t, s, backup)
	s.Close()
	b := openBackup(t, backup)
	old := filepath.Join(dir, "old.db")
	if _, err := bolt.Restore(old, b, bolt.RestoreOptions{Keyring: a}); err != nil {
		t.Fatal(err)
	}
	before := fileHash(t, old)
	entries := func() int {
		es, err := os.ReadDir(dir)
		if err != nil {
			t.Fatal(err)
		}
		return len(es)
	}
	n := entries()

	limitFileSize(t, 64<<10)
	fresh := filepath.Join(dir, "fresh.db")
	if _, err := bolt.Restore(fresh, b, bolt.RestoreOptions{Keyring: a}); err == nil {
		t.Fatal("sanity: the restore passed the file size limit")
	}
	if _, err := os.Stat(fresh); !errors.Is(err, os.ErrNotExist) {
		t.Errorf("a failed restore left %s (%v)", fresh, err)
	}
	if _, err := bolt.Restore(old, b, bolt.RestoreOptions{Keyring: a, Replace: true}); err == nil {
		t.Fatal("sanity: the replacing restore passed the file size limit")
	}
	if fileHash(t, old) != before {
		t.Error("a failed replacing restore changed the data file")
	}
	if got := entries(); got != n {
		t.Errorf("the failed restores left %d files in the directory", got-n)
	}
	s, err := bolt.Open(old, bolt.Options{Keyring: a})
	if err != nil {
		t.Fatalf("the data file after a failed replacing restore: %v", err)
	}
	s.Close()
}
