package bolt

import (
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"time"

	bbolt "go.etcd.io/bbolt"
	bolterrors "go.etcd.io/bbolt/errors"

	"tokenbroker/storage"
)

// ErrNotEmpty means a restore's target data file exists.
var ErrNotEmpty = errors.New("storage: restore target exists")

// RestoreOptions configure [Restore].
type RestoreOptions struct {
	// Keyring must open every record of the backup. Required.
	Keyring *storage.Keyring
	// Replace allows replacing a data file that exists.
	Replace bool
	// Now stamps the restore intent. Default time.Now.
	Now func() time.Time
	// LockTimeout bounds the wait for a data file held by a running
	// broker. Default 250 ms.
	LockTimeout time.Duration
}

// Restore writes every connection of src into the data file at path in
// one transaction: all of them or, on any failure, none. Before it writes
// anything it checks that the key opens every record of src. It refuses a
// data file another process holds ([storage.ErrInUse]) and, unless
// Replace, one that exists ([ErrNotEmpty]). Token chains are
// marked with [storage.IntentRestored]. It returns how many connections
// it restored.
//
// The restore is written to a new file beside path, synced, and moved to
// path only once complete: a restore that fails leaves no file, or the
// one it was to replace as it was, and a replaced file goes whole, free
// pages (with what was erased from it) included.
func Restore(path string, src *Backup, opts RestoreOptions) (int64, error) {
	if opts.Now == nil {
		opts.Now = time.Now
	}
	if opts.LockTimeout <= 0 {
		opts.LockTimeout = 250 * time.Millisecond
	}
	// A target that is in use or exists is refused before the (long)
	// check of the backup. One to replace stays locked until the restored
	// file has taken its place, so no broker starts on it meanwhile.
	old, err := checkedTarget(path, opts)
	if err != nil {
		return 0, err
	}
	if old != nil {
		defer old.Close()
	}
	if _, err := src.Verify(opts.Keyring); err != nil {
		return 0, err
	}
	tmp, n, err := writeRestoreFile(path, src, opts)
	if err != nil {
		return 0, fmt.Errorf("storage: restore %s: nothing written: %w", path, err)
	}
	if err := publishRestore(tmp, path, old != nil); err != nil {
		os.Remove(tmp)
		return 0, err
	}
	return n, nil
}

// writeRestoreFile writes src, restored, into a new file beside path and
// syncs it; it returns the file's path. On failure it leaves no file.
func writeRestoreFile(path string, src *Backup, opts RestoreOptions) (string, int64, error) {
	f, err := os.CreateTemp(filepath.Dir(path), filepath.Base(path)+".restore-*")
	if err != nil {
		return "", 0, err
	}
	tmp := f.Name()
	f.Close()
	n, err := writeRestoreTo(tmp, src, opts)
	if err != nil {
		os.Remove(tmp)
		return "", 0, err
	}
	return tmp, n, nil
}

// writeRestoreTo opens the new file at tmp with bbolt, writes the restore
// and syncs the file.
func writeRestoreTo(tmp string, src *Backup, opts RestoreOptions) (int64, error) {
	db, err := bbolt.Open(tmp, 0o600, &bbolt.Options{Timeout: opts.LockTimeout})
	if err != nil {
		return 0, err
	}
	n, err := writeRestore(db, src, storage.NewCodec(opts.Keyring), opts.Now())
	if cerr := db.Close(); err == nil {
		err = cerr
	}
	if err == nil {
		err = syncFile(tmp)
	}
	return n, err
}

// publishRestore moves the restored file at tmp to path and syncs the
// directory. A replaced file (whose lock the caller holds) is renamed
// over; a new one is linked into place, so that a data file created at
// path meanwhile (a broker started on it) is refused, not replaced under
// the broker.
func publishRestore(tmp, path string, replace bool) error {
	var err error
	if replace {
		err = os.Rename(tmp, path)
	} else if err = os.Link(tmp, path); err == nil {
		os.Remove(tmp)
	}
	switch {
	case errors.Is(err, os.ErrExist):
		return fmt.Errorf("%w: %s was created while the restore ran", ErrNotEmpty, path)
	case err != nil:
		return fmt.Errorf("storage: restore %s: %w", path, err)
	}
	if err := syncDir(filepath.Dir(path)); err != nil {
		return fmt.Errorf("storage: restore: sync %s: %w", filepath.Dir(path), err)
	}
	return nil
}

// syncFile flushes the file at path to disk.
func syncFile(path string) error {
	f, err := os.Open(path)
	if err != nil {
		return err
	}
	defer f.Close()
	return f.Sync()
}

// checkedTarget opens the target file if it exists and refuses it unless
// Replace; nil when there is none yet.
func checkedTarget(path string, opts RestoreOptions) (*bbolt.DB, error) {
	if _, err := os.Stat(path); err != nil {
		return nil, nil
	}
	db, err := openTarget(path, opts)
	if err != nil {
		return nil, err
	}
	if err := checkTarget(db, path, opts.Replace); err != nil {
		db.Close()
		return nil, err
	}
	return db, nil
}

// writeRestore replaces everything in db with src's connections in one
// transaction, token chains marked as restored.
func writeRestore(db *bbolt.DB, src *Backup, codec *storage.Codec, now time.Time) (int64, error) {
	meta, err := codec.EncodeMeta(now)
	if err != nil {
		return 0, err
	}
	var n int64
	err = db.Update(func(tx *bbolt.Tx) error {
		n = 0
		if err := resetBuckets(tx, meta); err != nil {
			return err
		}
		conns, tokens := tx.Bucket(bucketConnections), tx.Bucket(bucketTokens)
		return src.Each(func(r storage.Record) error {
			cv, err := codec.RestoredConnection(r)
			if err != nil {
				return err
			}
			tv, err := codec.RestoredTokens(r, now)
			if err != nil {
				return err
			}
			if err := conns.Put([]byte(r.Name), cv); err != nil {
				return err
			}
			n++
			return tokens.Put([]byte(r.Name), tv)
		})
	})
	return n, err
}

// openTarget opens (or creates) a restore's target file, holding its lock.
func openTarget(path string, opts RestoreOptions) (*bbolt.DB, error) {
	db, err := bbolt.Open(path, 0o600, &bbolt.Options{Timeout: opts.LockTimeout})
	switch {
	case errors.Is(err, bolterrors.ErrTimeout):
		return nil, fmt.Errorf("%w: %s (stop the broker that serves it first)", storage.ErrInUse, path)
	case errors.Is(err, bolterrors.ErrInvalid), errors.Is(err, bolterrors.ErrVersionMismatch), errors.Is(err, bolterrors.ErrChecksum):
		return nil, fmt.Errorf("%w: %s: %v", storage.ErrNotDataFile, path, err)
	case err != nil:
		return nil, fmt.Errorf("storage: restore: %w", err)
	}
	return db, nil
}

// checkTarget refuses, unless replace, a data file that exists: even one
// without connections may be a broker's that just started.
func checkTarget(db *bbolt.DB, path string, replace bool) error {
	if replace {
		return nil
	}
	var n int
	err := db.View(func(tx *bbolt.Tx) error {
		if b := tx.Bucket(bucketConnections); b != nil {
			n = b.Stats().KeyN
		}
		return nil
	})
	if err != nil {
		return fmt.Errorf("%w: %s: %v", storage.ErrNotDataFile, path, err)
	}
	return fmt.Errorf("%w: %s exists and holds %d connections; give --replace to replace it", ErrNotEmpty, path, n)
}

// resetBuckets empties the store's buckets and writes a new meta record.
func resetBuckets(tx *bbolt.Tx, meta []byte) error {
	for _, name := range [][]byte{bucketMeta, bucketConnections, bucketTokens, bucketDeleting} {
		if tx.Bucket(name) != nil {
			if err := tx.DeleteBucket(name); err != nil {
				return err
			}
		}
		if _, err := tx.CreateBucket(name); err != nil {
			return err
		}
	}
	return tx.Bucket(bucketMeta).Put(keyMeta, meta)
}
