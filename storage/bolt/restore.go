package bolt

import (
	"errors"
	"fmt"
	"os"
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
func Restore(path string, src *Backup, opts RestoreOptions) (int64, error) {
	if opts.Now == nil {
		opts.Now = time.Now
	}
	if opts.LockTimeout <= 0 {
		opts.LockTimeout = 250 * time.Millisecond
	}
	// A target that is in use or exists is refused before the (long)
	// check of the backup, and a new file is created only after it.
	db, err := checkedTarget(path, opts)
	if err != nil {
		return 0, err
	}
	if db != nil {
		defer db.Close()
	}
	if _, err := src.Verify(opts.Keyring); err != nil {
		return 0, err
	}
	if db == nil {
		if db, err = openTarget(path, opts); err != nil {
			return 0, err
		}
		defer db.Close()
	}
	n, err := writeRestore(db, src, storage.NewCodec(opts.Keyring), opts.Now())
	if err != nil {
		return 0, fmt.Errorf("storage: restore %s: nothing written: %w", path, err)
	}
	return n, nil
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
