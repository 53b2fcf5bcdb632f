package bolt

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"time"

	bbolt "go.etcd.io/bbolt"
	bolterrors "go.etcd.io/bbolt/errors"

	"tokenbroker/storage"
)

// Snapshot reads every connection in one read transaction, so the
// snapshot is consistent while writes go on: header gets the meta record
// and the number of connections first, then each gets every connection's
// records in name order. The values are only valid during the call. It is
// a long read (see [Store.longView]): a delete made meanwhile answers at
// once, and its records' bytes are wiped from the file when the snapshot
// ends.
func (s *Store) Snapshot(ctx context.Context, header func(storage.SnapshotInfo) error, each func(storage.Record) error) error {
	return s.longView(func(tx *bbolt.Tx) error {
		conns := tx.Bucket(bucketConnections)
		info := storage.SnapshotInfo{Store: "bbolt", Meta: tx.Bucket(bucketMeta).Get(keyMeta), Count: int64(conns.Stats().KeyN)}
		if err := header(info); err != nil {
			return err
		}
		tokens := tx.Bucket(bucketTokens)
		cur := conns.Cursor()
		for k, v := cur.First(); k != nil; k, v = cur.Next() {
			if err := ctx.Err(); err != nil {
				return err
			}
			if err := each(storage.Record{Name: string(k), Connection: v, Tokens: tokens.Get(k)}); err != nil {
				return err
			}
		}
		return nil
	})
}

// KeyUse counts every stored value by the keys that sealed it, in one
// read transaction: a long read (see [Store.longView]), since it opens
// every value.
func (s *Store) KeyUse(ctx context.Context) (storage.KeyUse, error) {
	var u storage.KeyUse
	err := s.longView(func(tx *bbolt.Tx) error {
		if err := u.Add(s.codec, storage.KindMeta, tx.Bucket(bucketMeta).Get(keyMeta)); err != nil {
			return err
		}
		for _, b := range []struct {
			name []byte
			kind storage.Kind
		}{{bucketConnections, storage.KindConnection}, {bucketDeleting, storage.KindConnection}, {bucketTokens, storage.KindTokens}} {
			err := tx.Bucket(b.name).ForEach(func(k, v []byte) error {
				if err := ctx.Err(); err != nil {
					return err
				}
				return u.Add(s.codec, b.kind, v)
			})
			if err != nil {
				return err
			}
		}
		return nil
	})
	return u, err
}

// stale is one stored value to reseal: where it is, what it held when
// read, and what replaces it.
type stale struct {
	bucket []byte
	key    []byte
	kind   storage.Kind
	old    []byte
	new    []byte
}

// ResealBatch reseals with the sealing key up to limit stored values not
// sealed with it, among the connections after the name after ("" starts
// with the meta record). Values are read in a read transaction, opened and
// sealed outside any transaction, and written through the group committer
// with the serving writes, each only if it did not change meanwhile (a
// value the broker rewrote is sealed with the sealing key already). It
// returns the name to continue after, "" when the pass is done.
// Interrupted anywhere, nothing is lost: a pass that starts again finds
// what is still stale.
func (s *Store) ResealBatch(ctx context.Context, after string, limit int) (next string, st storage.ResealStats, err error) {
	batch, next, st, err := s.findStale(after, limit)
	if err != nil || len(batch) == 0 {
		return next, st, err
	}
	for i := range batch {
		b := &batch[i]
		if b.new, err = s.codec.Reseal(b.kind, string(b.key), b.old); err != nil {
			if b.kind == storage.KindMeta {
				return "", st, err
			}
			return "", st, fmt.Errorf("storage: reseal %s: %w", b.key, err)
		}
	}
	var written int64
	err = s.write(ctx, func(tx *bbolt.Tx) error {
		written = 0
		for _, b := range batch {
			bk := tx.Bucket(b.bucket)
			if !bytes.Equal(bk.Get(b.key), b.old) {
				continue
			}
			if err := bk.Put(b.key, b.new); err != nil {
				return err
			}
			written++
		}
		return nil
	})
	st.Resealed = written
	return next, st, err
}

// findStale collects up to limit stale values after the name after,
// examining at most 8*limit connections so that a pass over fresh records
// still reports progress. It is a long read (see [Store.longView]): it
// opens every value it examines.
func (s *Store) findStale(after string, limit int) (batch []stale, next string, st storage.ResealStats, err error) {
	err = s.longView(func(tx *bbolt.Tx) error {
		if after == "" {
			v := tx.Bucket(bucketMeta).Get(keyMeta)
			st.Examined++
			ok, err := s.codec.Stale(storage.KindMeta, v)
			if err != nil {
				return err
			}
			if ok {
				batch = append(batch, stale{bucketMeta, keyMeta, storage.KindMeta, bytes.Clone(v), nil})
			}
			if err := s.staleDeleting(tx, &batch, &st); err != nil {
				return err
			}
		}
		tokens := tx.Bucket(bucketTokens)
		cur := tx.Bucket(bucketConnections).Cursor()
		k, v := cur.Seek([]byte(after))
		if k != nil && string(k) == after {
			k, v = cur.Next()
		}
		seen, last := 0, ""
		for ; k != nil; k, v = cur.Next() {
			if len(batch) >= limit || seen >= 8*limit {
				next = last // the pass goes on after the last name examined
				return nil
			}
			seen, last = seen+1, string(k) // a copy: k is only valid in the transaction
			for _, r := range []stale{
				{bucketConnections, k, storage.KindConnection, v, nil},
				{bucketTokens, k, storage.KindTokens, tokens.Get(k), nil},
			} {
				if r.old == nil {
					continue
				}
				st.Examined++
				ok, err := s.codec.Stale(r.kind, r.old)
				if err != nil {
					return fmt.Errorf("storage: %s: %w", k, err)
				}
				if ok {
					r.key, r.old = bytes.Clone(r.key), bytes.Clone(r.old)
					batch = append(batch, r)
				}
			}
		}
		return nil
	})
	return batch, next, st, err
}

// staleDeleting adds to batch the stale records of deletes in progress
// (see [Store.MarkDeleting]) and of their tokens: few, and the store
// refuses to start without a key they need.
func (s *Store) staleDeleting(tx *bbolt.Tx, batch *[]stale, st *storage.ResealStats) error {
	tokens := tx.Bucket(bucketTokens)
	return tx.Bucket(bucketDeleting).ForEach(func(k, v []byte) error {
		for _, r := range []stale{
			{bucketDeleting, k, storage.KindConnection, v, nil},
			{bucketTokens, k, storage.KindTokens, tokens.Get(k), nil},
		} {
			if r.old == nil {
				continue
			}
			st.Examined++
			ok, err := s.codec.Stale(r.kind, r.old)
			if err != nil {
				return fmt.Errorf("storage: %s: %w", k, err)
			}
			if ok {
				r.key, r.old = bytes.Clone(r.key), bytes.Clone(r.old)
				*batch = append(*batch, r)
			}
		}
		return nil
	})
}

// BackupWriter writes a backup: a bbolt data file in the store's own
// format, its records sealed as they were stored. It writes to a
// temporary file beside the final one; [BackupWriter.Publish] renames it
// into place, so a backup is either complete or absent.
type BackupWriter struct {
	db      *bbolt.DB
	path    string
	tmp     string
	pending []storage.Record
	count   int64
}

// backupBatch is how many connections one transaction of a backup writes.
const backupBatch = 5000

// CreateBackup starts a backup to be published at path.
func CreateBackup(path string) (*BackupWriter, error) {
	f, err := os.CreateTemp(filepath.Dir(path), filepath.Base(path)+".tmp-*")
	if err != nil {
		return nil, fmt.Errorf("storage: backup: %w", err)
	}
	tmp := f.Name()
	f.Close()
	// Durability comes from one sync at the end, not one per transaction.
	db, err := bbolt.Open(tmp, 0o600, &bbolt.Options{Timeout: time.Second, NoSync: true, NoFreelistSync: true})
	if err != nil {
		os.Remove(tmp)
		return nil, fmt.Errorf("storage: backup: %w", err)
	}
	err = db.Update(func(tx *bbolt.Tx) error {
		for _, name := range [][]byte{bucketMeta, bucketConnections, bucketTokens} {
			if _, err := tx.CreateBucket(name); err != nil {
				return err
			}
		}
		return nil
	})
	if err != nil {
		db.Close()
		os.Remove(tmp)
		return nil, fmt.Errorf("storage: backup: %w", err)
	}
	return &BackupWriter{db: db, path: path, tmp: tmp}, nil
}

// TempPath is the file being written, until it is published.
func (w *BackupWriter) TempPath() string { return w.tmp }

// SetMeta stores the source's meta record.
func (w *BackupWriter) SetMeta(meta []byte) error {
	return w.db.Update(func(tx *bbolt.Tx) error { return tx.Bucket(bucketMeta).Put(keyMeta, bytes.Clone(meta)) })
}

// Add adds one connection's records; they are copied.
func (w *BackupWriter) Add(r storage.Record) error {
	w.pending = append(w.pending, storage.Record{Name: r.Name, Connection: bytes.Clone(r.Connection), Tokens: bytes.Clone(r.Tokens)})
	if len(w.pending) >= backupBatch {
		return w.flush()
	}
	return nil
}

func (w *BackupWriter) flush() error {
	if len(w.pending) == 0 {
		return nil
	}
	err := w.db.Update(func(tx *bbolt.Tx) error {
		conns, tokens := tx.Bucket(bucketConnections), tx.Bucket(bucketTokens)
		// Names arrive in order: full pages.
		conns.FillPercent, tokens.FillPercent = 1, 1
		for _, r := range w.pending {
			if err := conns.Put([]byte(r.Name), r.Connection); err != nil {
				return err
			}
			if r.Tokens != nil {
				if err := tokens.Put([]byte(r.Name), r.Tokens); err != nil {
					return err
				}
			}
		}
		return nil
	})
	if err != nil {
		return fmt.Errorf("storage: backup: %w", err)
	}
	w.count += int64(len(w.pending))
	w.pending = w.pending[:0]
	return nil
}

// Finish writes what is pending, syncs the file to disk and closes it. It
// returns how many connections the backup holds.
func (w *BackupWriter) Finish() (int64, error) {
	if err := w.flush(); err != nil {
		return 0, err
	}
	if err := w.db.Sync(); err != nil {
		return 0, fmt.Errorf("storage: backup: sync: %w", err)
	}
	if err := w.db.Close(); err != nil {
		return 0, fmt.Errorf("storage: backup: %w", err)
	}
	return w.count, nil
}

// Publish renames the finished backup into place and syncs the directory,
// so the name points at the complete file even after a power loss.
func (w *BackupWriter) Publish() error {
	if err := os.Rename(w.tmp, w.path); err != nil {
		return fmt.Errorf("storage: backup: %w", err)
	}
	if err := syncDir(filepath.Dir(w.path)); err != nil {
		return fmt.Errorf("storage: backup: sync %s: %w", filepath.Dir(w.path), err)
	}
	return nil
}

// Abort removes the unfinished file.
func (w *BackupWriter) Abort() {
	w.db.Close()
	os.Remove(w.tmp)
}

// Backup is a backup file opened read-only.
type Backup struct {
	db   *bbolt.DB
	meta []byte
}

// OpenBackup opens a backup file (or a stopped broker's data file, which
// has the same format) read-only.
func OpenBackup(path string) (*Backup, error) {
	if info, err := os.Stat(path); err != nil {
		return nil, fmt.Errorf("storage: backup: %w", err)
	} else if info.Size() < 4096 {
		return nil, fmt.Errorf("%w: %s is %d bytes", storage.ErrNotDataFile, path, info.Size())
	}
	db, err := bbolt.Open(path, 0o600, &bbolt.Options{ReadOnly: true, Timeout: 2 * time.Second})
	switch {
	case errors.Is(err, bolterrors.ErrTimeout):
		return nil, fmt.Errorf("%w: %s", storage.ErrInUse, path)
	case errors.Is(err, bolterrors.ErrInvalid), errors.Is(err, bolterrors.ErrVersionMismatch), errors.Is(err, bolterrors.ErrChecksum):
		return nil, fmt.Errorf("%w: %s: %v", storage.ErrNotDataFile, path, err)
	case err != nil:
		return nil, fmt.Errorf("storage: backup: %w", err)
	}
	b := &Backup{db: db}
	err = db.View(func(tx *bbolt.Tx) error {
		for _, name := range [][]byte{bucketMeta, bucketConnections, bucketTokens} {
			if tx.Bucket(name) == nil {
				return fmt.Errorf("%w: %s has no %s bucket", storage.ErrNotDataFile, path, name)
			}
		}
		b.meta = bytes.Clone(tx.Bucket(bucketMeta).Get(keyMeta))
		if b.meta == nil {
			return fmt.Errorf("%w: %s has no meta record", storage.ErrNotDataFile, path)
		}
		return nil
	})
	if err != nil {
		db.Close()
		return nil, err
	}
	return b, nil
}

// Close closes the file.
func (b *Backup) Close() error { return b.db.Close() }

// Path is the file's path.
func (b *Backup) Path() string { return b.db.Path() }

// Meta is the meta record of the store the backup was taken from.
func (b *Backup) Meta() []byte { return b.meta }

// Count is the number of connections in the backup.
func (b *Backup) Count() (int64, error) {
	var n int64
	err := b.db.View(func(tx *bbolt.Tx) error {
		n = int64(tx.Bucket(bucketConnections).Stats().KeyN)
		return nil
	})
	return n, err
}

// Each calls fn for every connection in name order. The record's values
// are only valid during the call.
func (b *Backup) Each(fn func(storage.Record) error) error {
	return b.db.View(func(tx *bbolt.Tx) error {
		tokens := tx.Bucket(bucketTokens)
		return tx.Bucket(bucketConnections).ForEach(func(k, v []byte) error {
			return fn(storage.Record{Name: string(k), Connection: v, Tokens: tokens.Get(k)})
		})
	})
}

// Verify checks that keys open the backup's meta record and every record
// in it, and returns how many connections it holds.
func (b *Backup) Verify(keys *storage.Keyring) (int64, error) {
	codec := storage.NewCodec(keys)
	st, err := codec.OpenMeta(b.Path(), b.meta)
	if err != nil {
		return 0, err
	}
	if st.Upgrade {
		// Its records carry no record seal: only a broker's open upgrades
		// them, trusting them once.
		return 0, fmt.Errorf("%w: %s has the record format of an older broker; start this version's broker on it once (it upgrades the file), then back that broker up", storage.ErrNotDataFile, b.Path())
	}
	var n int64
	err = b.Each(func(r storage.Record) error {
		if err := codec.CheckRecord(r); err != nil {
			return err
		}
		n++
		return nil
	})
	return n, err
}

// SealingKeyIDs lists the store's key ids, the sealing key first.
func (s *Store) SealingKeyIDs() []string { return s.codec.SealingKeyIDs() }
