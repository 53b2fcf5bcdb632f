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
	keyProbe          = []byte("probe") // in bucketMeta, only while a probe write runs
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
	// SkipFullCheck leaves out bbolt's whole-file consistency check at
	// open, keeping only the pages-within-the-file and every-record-readable
	// checks. The full check is what finds a free list naming a page in use
	// (which the next write would overwrite); at 100,000 connections it
	// adds about a tenth to the time of open and load together (45-65 ms;
	// see BenchmarkStartup). Default off: the full check runs.
	SkipFullCheck bool
}

// Store is the embedded store on one bbolt file.
type Store struct {
	db    *bbolt.DB
	path  string
	ident os.FileInfo // the open file, to compare with what path names
	fd    uintptr     // its descriptor, for the operator to copy it back from
	codec *storage.Codec
	now   func() time.Time
	max   int

	writes  chan *writeReq
	quit    chan struct{}
	done    chan struct{}
	commits atomic.Int64 // transactions committed by the group committer
	written atomic.Int64 // writes carried by them

	health    health
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
// process fails within LockTimeout with [storage.ErrInUse]; a foreign file
// fails with [storage.ErrNotDataFile], a damaged one with
// [storage.ErrCorrupt] and a wrong key with [storage.ErrWrongKey], in every
// case without modifying the file.
func Open(path string, opts Options) (*Store, error) {
	if opts.Keyring == nil {
		return nil, errors.New("storage: bolt: Options.Keyring is required")
	}
	opts = opts.withDefaults()
	if info, err := os.Stat(path); err == nil && info.Size() > 0 && info.Size() < 4096 {
		// bbolt would try to read meta pages past the end; a file this small
		// was not written by bbolt.
		return nil, fmt.Errorf("%w: %s is %d bytes", storage.ErrNotDataFile, path, info.Size())
	}
	db, file, err := openDB(path, opts)
	if err != nil {
		return nil, err
	}
	if err := inspect(db, file, path, !opts.SkipFullCheck); err != nil {
		db.Close()
		return nil, err
	}
	s := &Store{
		db: db, path: path, codec: storage.NewCodec(opts.Keyring), now: opts.Now, max: opts.MaxBatch,
		writes: make(chan *writeReq, opts.MaxBatch),
		quit:   make(chan struct{}),
		done:   make(chan struct{}),
	}
	if s.ident, err = file.Stat(); err != nil {
		db.Close()
		return nil, fmt.Errorf("storage: stat %s: %w", path, err)
	}
	s.fd = file.Fd()
	if err := guard(path, func() error { return s.checkOrInit(path) }); err != nil {
		db.Close()
		return nil, err
	}
	go s.commitLoop()
	return s, nil
}

func (o Options) withDefaults() Options {
	if o.LockTimeout <= 0 {
		o.LockTimeout = 2 * time.Second
	}
	if o.Now == nil {
		o.Now = time.Now
	}
	if o.MaxBatch <= 0 {
		o.MaxBatch = 1000
	}
	return o
}

// openDB opens the file with bbolt and returns the *os.File bbolt reads
// and writes, whose identity tells later whether the path still names it.
// bbolt reads the free list at open, so a damaged one panics there, with
// the file locked and mapped: it is then unlocked and closed here and
// reported corrupt (the map, out of reach, stays until the process exits).
func openDB(path string, opts Options) (*bbolt.DB, *os.File, error) {
	var file *os.File
	bopts := &bbolt.Options{
		Timeout: opts.LockTimeout,
		OpenFile: func(name string, flag int, perm os.FileMode) (*os.File, error) {
			f, err := os.OpenFile(name, flag, perm)
			file = f
			return f, err
		},
	}
	if opts.Populate {
		bopts.MmapFlags = mapPopulate
	}
	var db *bbolt.DB
	err := guard(path, func() error {
		var err error
		db, err = bbolt.Open(path, 0o600, bopts)
		return err
	})
	switch {
	case errors.Is(err, storage.ErrCorrupt):
		if file != nil {
			releaseAbandoned(file)
		}
		return nil, nil, err
	case errors.Is(err, bolterrors.ErrTimeout):
		return nil, nil, fmt.Errorf("%w: %s (lock not released within %v; is another tokenbroker running on this data dir?)", storage.ErrInUse, path, opts.LockTimeout)
	case errors.Is(err, bolterrors.ErrChecksum):
		return nil, nil, corrupt(path, "both meta pages fail their checksum")
	case errors.Is(err, bolterrors.ErrInvalid), errors.Is(err, bolterrors.ErrVersionMismatch):
		return nil, nil, fmt.Errorf("%w: %s: %v", storage.ErrNotDataFile, path, err)
	case err != nil:
		return nil, nil, fmt.Errorf("storage: open %s: %w", path, err)
	}
	return db, file, nil
}

// checkOrInit verifies the meta record, or initializes an empty file.
func (s *Store) checkOrInit(path string) error {
	var meta []byte
	empty, fresh := true, false
	err := s.db.View(func(tx *bbolt.Tx) error {
		// bbolt starts a file with four pages: two meta pages, the free
		// list and an empty root.
		fresh = tx.Size() == 4*int64(tx.DB().Info().PageSize)
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
	if !fresh {
		// Pages were written, yet no bucket is left: the root was lost.
		return corrupt(path, "it has pages but no buckets")
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

// commit writes a batch in one transaction, unless the store already
// knows a write would be lost (a damaged file, or the path no longer naming
// the open file). A batch that committed to a file the path no longer names
// fails too: a restart would not find it.
func (s *Store) commit(batch []*writeReq) {
	s.commits.Add(1)
	s.written.Add(int64(len(batch)))
	err := s.refuseWrites()
	if err == nil {
		err = s.guard(func() error {
			return s.db.Update(func(tx *bbolt.Tx) error {
				for _, r := range batch {
					r.err = r.fn(tx)
				}
				return nil
			})
		})
		if err == nil {
			err = s.checkFile()
		} else if !errors.Is(err, storage.ErrCorrupt) {
			err = fmt.Errorf("storage: commit: %w", err)
		}
	}
	s.health.noteWrite(err)
	for _, r := range batch {
		if err != nil {
			r.err = err
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
	err := s.view(func(tx *bbolt.Tx) error {
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

// decodePair decodes a connection and its token state (none when tv is
// nil) straight from the memory map, under guard: LoadAll runs it on
// goroutines of its own.
func (s *Store) decodePair(key, cv, tv []byte) (c *storage.Connection, t *storage.Tokens, err error) {
	err = s.guard(func() error {
		if c, err = s.decodeConnection(key, cv); err != nil {
			return err
		}
		t = &storage.Tokens{}
		if tv != nil {
			t, err = s.decodeTokens(key, tv)
		}
		return err
	})
	return c, t, err
}

// ListConnections returns up to limit connections whose names start with
// prefix and sort after the name after, in name order.
func (s *Store) ListConnections(ctx context.Context, prefix, after string, limit int) ([]*storage.Connection, error) {
	var out []*storage.Connection
	err := s.view(func(tx *bbolt.Tx) error {
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
	err := s.view(func(tx *bbolt.Tx) error {
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
	return s.view(func(tx *bbolt.Tx) error {
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
					c, t, err := s.decodePair(it.k, it.cv, it.tv)
					if err != nil {
						errc <- err
						return
					}
					if err := fn(c, t); err != nil {
						errc <- err
						return
					}
				}
			}()
		}
		// The walk is guarded on its own, so that a damaged page still
		// lets the workers finish before the transaction ends.
		sendErr := s.guard(func() error {
			tokens := tx.Bucket(bucketTokens)
			cur := tx.Bucket(bucketConnections).Cursor()
			for k, v := cur.First(); k != nil; k, v = cur.Next() {
				select {
				case items <- item{k, v, tokens.Get(k)}:
				case err := <-errc:
					return err
				case <-ctx.Done():
					return ctx.Err()
				}
			}
			return nil
		})
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
