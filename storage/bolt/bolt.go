package bolt

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"os"
	"runtime"
	"sync"
	"sync/atomic"
	"time"

	bbolt "go.etcd.io/bbolt"
	bolterrors "go.etcd.io/bbolt/errors"

	"tokenbroker/storage"
)

var (
	bucketMeta        = []byte("meta")
	bucketConnections = []byte("connections")
	bucketTokens      = []byte("tokens")
	keyMeta           = []byte("meta")
)

// Options configure [Open]. Zero fields mean the documented defaults.
type Options struct {
	// Keyring seals secrets and tokens. Required.
	Keyring *storage.Keyring
	// LockTimeout bounds the wait for the file lock held by another process.
	// Default 2 s.
	LockTimeout time.Duration
	// Now returns the current time. Default time.Now.
	Now func() time.Time
	// MaxBatch bounds how many writes share one transaction. Default 1000.
	MaxBatch int
	// Populate reads the whole file into memory at open (MAP_POPULATE on
	// Linux): one sequential read instead of a page fault per page when
	// every record is about to be read anyway. Default off.
	Populate bool
}

// Store is the embedded store on one bbolt file.
type Store struct {
	db    *bbolt.DB
	codec *storage.Codec
	now   func() time.Time
	max   int

	writes  chan *writeReq
	quit    chan struct{}
	done    chan struct{}
	commits atomic.Int64 // transactions committed by the group committer
	written atomic.Int64 // writes carried by them

	closeOnce sync.Once
}

// writeReq is one write waiting for the group committer. fn must check every
// precondition before it changes anything, so that a failing fn leaves the
// shared transaction untouched.
type writeReq struct {
	fn   func(tx *bbolt.Tx) error
	err  error
	done chan struct{}
}

// Open opens or creates the data file at path. A file held by another
// process fails within LockTimeout with [storage.ErrInUse]; a corrupt or
// foreign file fails with [storage.ErrNotDataFile] and a wrong key with
// [storage.ErrWrongKey], in both cases without modifying the file.
func Open(path string, opts Options) (*Store, error) {
	if opts.Keyring == nil {
		return nil, errors.New("storage: bolt: Options.Keyring is required")
	}
	if opts.LockTimeout <= 0 {
		opts.LockTimeout = 2 * time.Second
	}
	if opts.Now == nil {
		opts.Now = time.Now
	}
	if opts.MaxBatch <= 0 {
		opts.MaxBatch = 1000
	}
	if info, err := os.Stat(path); err == nil && info.Size() > 0 && info.Size() < 4096 {
		// bbolt would try to read meta pages past the end; a file this small
		// was not written by bbolt.
		return nil, fmt.Errorf("%w: %s is %d bytes", storage.ErrNotDataFile, path, info.Size())
	}
	bopts := &bbolt.Options{Timeout: opts.LockTimeout}
	if opts.Populate {
		bopts.MmapFlags = mapPopulate
	}
	db, err := bbolt.Open(path, 0o600, bopts)
	switch {
	case errors.Is(err, bolterrors.ErrTimeout):
		return nil, fmt.Errorf("%w: %s (lock not released within %v; is another tokenbroker running on this data dir?)", storage.ErrInUse, path, opts.LockTimeout)
	case errors.Is(err, bolterrors.ErrInvalid), errors.Is(err, bolterrors.ErrVersionMismatch), errors.Is(err, bolterrors.ErrChecksum):
		return nil, fmt.Errorf("%w: %s: %v", storage.ErrNotDataFile, path, err)
	case err != nil:
		return nil, fmt.Errorf("storage: open %s: %w", path, err)
	}
	s := &Store{
		db: db, codec: storage.NewCodec(opts.Keyring), now: opts.Now, max: opts.MaxBatch,
		writes: make(chan *writeReq, opts.MaxBatch),
		quit:   make(chan struct{}),
		done:   make(chan struct{}),
	}
	if err := s.checkOrInit(path); err != nil {
		db.Close()
		return nil, err
	}
	go s.commitLoop()
	return s, nil
}

// checkOrInit verifies the meta record, or initializes an empty file.
func (s *Store) checkOrInit(path string) error {
	var meta []byte
	empty := true
	err := s.db.View(func(tx *bbolt.Tx) error {
		return tx.ForEach(func(name []byte, b *bbolt.Bucket) error {
			empty = false
			if bytes.Equal(name, bucketMeta) {
				meta = bytes.Clone(b.Get(keyMeta))
			}
			return nil
		})
	})
	if err != nil {
		return fmt.Errorf("%w: %s: %v", storage.ErrNotDataFile, path, err)
	}
	if meta != nil {
		return s.codec.CheckMeta(path, meta)
	}
	if !empty {
		return fmt.Errorf("%w: %s holds bbolt buckets of another program", storage.ErrNotDataFile, path)
	}
	v, err := s.codec.EncodeMeta(s.now())
	if err != nil {
		return err
	}
	return s.db.Update(func(tx *bbolt.Tx) error {
		for _, name := range [][]byte{bucketConnections, bucketTokens} {
			if _, err := tx.CreateBucketIfNotExists(name); err != nil {
				return err
			}
		}
		b, err := tx.CreateBucketIfNotExists(bucketMeta)
		if err != nil {
			return err
		}
		return b.Put(keyMeta, v)
	})
}

// Close waits for queued writes and closes the file.
func (s *Store) Close() error {
	var err error
	s.closeOnce.Do(func() {
		close(s.quit)
		<-s.done
		err = s.db.Close()
	})
	return err
}

// CommitStats returns how many transactions (each one fsync) carried how
// many writes since Open.
func (s *Store) CommitStats() (commits, writes int64) {
	return s.commits.Load(), s.written.Load()
}

// Path is the data file's path.
func (s *Store) Path() string { return s.db.Path() }

// commitLoop is the group committer: it takes every write queued while the
// previous transaction was syncing and commits them in one transaction, so
// concurrent writers share one fsync instead of queueing one each.
func (s *Store) commitLoop() {
	defer close(s.done)
	for {
		var first *writeReq
		select {
		case first = <-s.writes:
		case <-s.quit:
			// Drain what was queued before Close.
			for {
				select {
				case r := <-s.writes:
					s.commit([]*writeReq{r})
				default:
					return
				}
			}
		}
		batch := []*writeReq{first}
	drain:
		for len(batch) < s.max {
			select {
			case r := <-s.writes:
				batch = append(batch, r)
			default:
				break drain
			}
		}
		s.commit(batch)
	}
}

func (s *Store) commit(batch []*writeReq) {
	s.commits.Add(1)
	s.written.Add(int64(len(batch)))
	err := s.db.Update(func(tx *bbolt.Tx) error {
		for _, r := range batch {
			r.err = r.fn(tx)
		}
		return nil
	})
	for _, r := range batch {
		if err != nil {
			r.err = fmt.Errorf("storage: commit: %w", err)
		}
		close(r.done)
	}
}

// write queues fn for the group committer and waits for its durable commit.
// The wait ignores ctx once the write is queued: a caller cannot learn
// whether a write it abandoned landed, so it never abandons one.
func (s *Store) write(ctx context.Context, fn func(tx *bbolt.Tx) error) error {
	if err := ctx.Err(); err != nil {
		return err
	}
	r := &writeReq{fn: fn, done: make(chan struct{})}
	select {
	case s.writes <- r:
	case <-s.quit:
		return storage.ErrClosed
	case <-ctx.Done():
		return ctx.Err()
	}
	<-r.done
	return r.err
}

// CreateConnection stores a new connection with its initial token state.
// It sets Revision to 1 and returns the stored connection.
func (s *Store) CreateConnection(ctx context.Context, c *storage.Connection, t *storage.Tokens) (*storage.Connection, error) {
	if t == nil {
		t = &storage.Tokens{}
	}
	c, cv, tv, err := s.codec.EncodeRecords(c, 1, t)
	if err != nil {
		return nil, err
	}
	key := []byte(c.Name)
	err = s.write(ctx, func(tx *bbolt.Tx) error {
		if tx.Bucket(bucketConnections).Get(key) != nil {
			return fmt.Errorf("%w: %s", storage.ErrAlreadyExists, c.Name)
		}
		if err := tx.Bucket(bucketConnections).Put(key, cv); err != nil {
			return err
		}
		return tx.Bucket(bucketTokens).Put(key, tv)
	})
	if err != nil {
		return nil, err
	}
	return c, nil
}

// GetConnection reads one connection.
func (s *Store) GetConnection(ctx context.Context, name string) (*storage.Connection, error) {
	var c *storage.Connection
	err := s.db.View(func(tx *bbolt.Tx) error {
		v := tx.Bucket(bucketConnections).Get([]byte(name))
		if v == nil {
			return fmt.Errorf("%w: %s", storage.ErrNotFound, name)
		}
		var err error
		c, err = s.decodeConnection([]byte(name), v)
		return err
	})
	return c, err
}

func (s *Store) decodeConnection(key, v []byte) (*storage.Connection, error) {
	return s.codec.DecodeConnection(string(key), v)
}

func (s *Store) decodeTokens(key, v []byte) (*storage.Tokens, error) {
	return s.codec.DecodeTokens(string(key), v)
}

// ListConnections returns up to limit connections whose names start with
// prefix and sort after the name after, in name order.
func (s *Store) ListConnections(ctx context.Context, prefix, after string, limit int) ([]*storage.Connection, error) {
	var out []*storage.Connection
	err := s.db.View(func(tx *bbolt.Tx) error {
		cur := tx.Bucket(bucketConnections).Cursor()
		start := []byte(prefix)
		if after > prefix {
			start = []byte(after)
		}
		for k, v := cur.Seek(start); k != nil && bytes.HasPrefix(k, []byte(prefix)) && len(out) < limit; k, v = cur.Next() {
			if string(k) <= after {
				continue
			}
			c, err := s.decodeConnection(k, v)
			if err != nil {
				return err
			}
			out = append(out, c)
		}
		return nil
	})
	return out, err
}

// UpdateConnection replaces a connection whose stored Revision equals
// c.Revision, and its token state when t is not nil. It returns the stored
// connection with the new revision.
func (s *Store) UpdateConnection(ctx context.Context, c *storage.Connection, t *storage.Tokens) (*storage.Connection, error) {
	want := c.Revision
	c, cv, tv, err := s.codec.EncodeRecords(c, want+1, t)
	if err != nil {
		return nil, err
	}
	key := []byte(c.Name)
	err = s.write(ctx, func(tx *bbolt.Tx) error {
		v := tx.Bucket(bucketConnections).Get(key)
		if v == nil {
			return fmt.Errorf("%w: %s", storage.ErrNotFound, c.Name)
		}
		rev, err := storage.Revision(v)
		if err != nil {
			return err
		}
		if rev != want {
			return fmt.Errorf("%w: %s is at revision %d, not %d", storage.ErrConflict, c.Name, rev, want)
		}
		if err := tx.Bucket(bucketConnections).Put(key, cv); err != nil {
			return err
		}
		if tv != nil {
			return tx.Bucket(bucketTokens).Put(key, tv)
		}
		return nil
	})
	if err != nil {
		return nil, err
	}
	return c, nil
}

// DeleteConnection erases a connection and its tokens. A revision other than
// 0 must match the stored one.
func (s *Store) DeleteConnection(ctx context.Context, name string, revision int64) error {
	key := []byte(name)
	return s.write(ctx, func(tx *bbolt.Tx) error {
		v := tx.Bucket(bucketConnections).Get(key)
		if v == nil {
			return fmt.Errorf("%w: %s", storage.ErrNotFound, name)
		}
		if revision != 0 {
			rev, err := storage.Revision(v)
			if err != nil {
				return err
			}
			if rev != revision {
				return fmt.Errorf("%w: %s is at revision %d, not %d", storage.ErrConflict, name, rev, revision)
			}
		}
		if err := tx.Bucket(bucketConnections).Delete(key); err != nil {
			return err
		}
		return tx.Bucket(bucketTokens).Delete(key)
	})
}

// GetTokens reads a connection's token state.
func (s *Store) GetTokens(ctx context.Context, name string) (*storage.Tokens, error) {
	var t *storage.Tokens
	err := s.db.View(func(tx *bbolt.Tx) error {
		v := tx.Bucket(bucketTokens).Get([]byte(name))
		if v == nil {
			return fmt.Errorf("%w: %s", storage.ErrNotFound, name)
		}
		var err error
		t, err = s.decodeTokens([]byte(name), v)
		return err
	})
	return t, err
}

// PutTokens durably replaces a connection's token state. It fails with
// [storage.ErrNotFound] if the connection was deleted, so a late refresh never
// resurrects one.
func (s *Store) PutTokens(ctx context.Context, name string, t *storage.Tokens) error {
	tv, err := s.codec.EncodeTokens(name, t)
	if err != nil {
		return err
	}
	key := []byte(name)
	return s.write(ctx, func(tx *bbolt.Tx) error {
		if tx.Bucket(bucketConnections).Get(key) == nil {
			return fmt.Errorf("%w: %s", storage.ErrNotFound, name)
		}
		return tx.Bucket(bucketTokens).Put(key, tv)
	})
}

// LoadAll calls fn for every connection with its token state. Records are
// decoded and unsealed by several goroutines at once, and fn is called from
// them concurrently, in no particular order. When it is done, the pages of
// the file it read are dropped from the process's resident memory (they stay
// in the page cache): everything it returned lives on the heap.
func (s *Store) LoadAll(ctx context.Context, fn func(*storage.Connection, *storage.Tokens) error) error {
	type item struct{ k, cv, tv []byte }
	workers := max(runtime.GOMAXPROCS(0), 1)
	return s.db.View(func(tx *bbolt.Tx) error {
		// Values stay valid while the transaction is open, so the workers
		// decode straight from the memory map.
		items := make(chan item, 256)
		errc := make(chan error, workers)
		var wg sync.WaitGroup
		for range workers {
			wg.Add(1)
			go func() {
				defer wg.Done()
				for it := range items {
					c, err := s.decodeConnection(it.k, it.cv)
					if err != nil {
						errc <- err
						return
					}
					t := &storage.Tokens{}
					if it.tv != nil {
						if t, err = s.decodeTokens(it.k, it.tv); err != nil {
							errc <- err
							return
						}
					}
					if err := fn(c, t); err != nil {
						errc <- err
						return
					}
				}
			}()
		}
		tokens := tx.Bucket(bucketTokens)
		cur := tx.Bucket(bucketConnections).Cursor()
		var sendErr error
	loop:
		for k, v := cur.First(); k != nil; k, v = cur.Next() {
			select {
			case items <- item{k, v, tokens.Get(k)}:
			case sendErr = <-errc:
				break loop
			case <-ctx.Done():
				sendErr = ctx.Err()
				break loop
			}
		}
		close(items)
		wg.Wait()
		// Everything is decoded into the heap: the file's pages are not
		// needed in this process's resident set any more.
		dropMapped(s.db, tx)
		if sendErr != nil {
			return sendErr
		}
		select {
		case err := <-errc:
			return err
		default:
			return nil
		}
	})
}
