package bolt

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"os"
	"path/filepath"
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
	// keyWipe, in bucketMeta, is written with every erase and gone from
	// the compacted copy: found at open, it says an erase's wipe was cut
	// short, and the wipe runs then.
	keyWipe = []byte("wipe")
	// bucketDeleting holds the connection records of deletes in progress
	// (see [Store.MarkDeleting]): out of bucketConnections, so every read
	// treats them as gone, yet durable until the delete is finished.
	bucketDeleting = []byte("deleting")
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
	// mu guards db, ident and fd, which an erase replaces with a compacted
	// copy's (see wipe): every transaction runs under its read lock.
	mu     sync.RWMutex
	db     *bbolt.DB
	ident  os.FileInfo // the open file, to compare with what path names
	fd     uintptr     // its descriptor, for the operator to copy it back from
	broken error       // set when a wipe could not reopen the file
	path   string
	opts   Options
	codec  *storage.Codec
	now    func() time.Time
	max    int

	upgraded int // records authenticated at open (a file of format 1)

	// long counts the long reads open (see [Store.longView]) and owed
	// says an erase's wipe waits for them to end; lmu guards both.
	lmu  sync.Mutex
	long int
	owed bool

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
	wipe bool // an erase: free pages are wiped before it answers (see wipe)
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
		db: db, path: path, opts: opts, codec: storage.NewCodec(opts.Keyring), now: opts.Now, max: opts.MaxBatch,
		writes: make(chan *writeReq, opts.MaxBatch),
		quit:   make(chan struct{}),
		done:   make(chan struct{}),
	}
	if s.ident, err = file.Stat(); err != nil {
		db.Close()
		return nil, fmt.Errorf("storage: stat %s: %w", path, err)
	}
	s.fd = file.Fd()
	// A wipe a crash cut short leaves its half-made copy; the lock is ours.
	os.Remove(path + compactSuffix)
	if err := guard(path, func() error { return s.checkOrInit(path) }); err != nil {
		db.Close()
		return nil, err
	}
	if err := s.finishWipe(); err != nil {
		s.closeDB()
		return nil, err
	}
	go s.commitLoop()
	return s, nil
}

// finishWipe runs the wipe of an erase that a crash cut short.
func (s *Store) finishWipe() error {
	pending := false
	if err := s.view(func(tx *bbolt.Tx) error {
		pending = tx.Bucket(bucketMeta).Get(keyWipe) != nil
		return nil
	}); err != nil {
		return err
	}
	if !pending {
		return nil
	}
	return s.wipe()
}

func (s *Store) closeDB() {
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.broken == nil {
		s.db.Close()
	}
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
		Timeout:         opts.LockTimeout,
		InitialMmapSize: mmapReserve,
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
		st, err := s.codec.OpenMeta(path, meta)
		if err != nil {
			return err
		}
		return s.bringUpToDate(meta, st)
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
		for _, name := range [][]byte{bucketConnections, bucketTokens, bucketDeleting} {
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

// bringUpToDate makes what st asks for in one transaction, and creates the
// buckets files of earlier versions lack. A file of format 1 is trusted
// once, as that version trusted it, and comes out authenticated.
func (s *Store) bringUpToDate(meta []byte, st storage.MetaStatus) error {
	hasDeleting := false
	s.db.View(func(tx *bbolt.Tx) error { hasDeleting = tx.Bucket(bucketDeleting) != nil; return nil })
	if hasDeleting && !st.Reseal {
		return nil
	}
	return s.db.Update(func(tx *bbolt.Tx) error {
		if _, err := tx.CreateBucketIfNotExists(bucketDeleting); err != nil {
			return err
		}
		if st.Upgrade {
			n, err := s.upgradeBucket(tx.Bucket(bucketConnections), s.codec.UpgradeConnection)
			if err != nil {
				return err
			}
			m, err := s.upgradeBucket(tx.Bucket(bucketTokens), s.codec.UpgradeTokens)
			if err != nil {
				return err
			}
			s.upgraded = n + m
		}
		if !st.Reseal {
			return nil
		}
		v, err := s.codec.ResealMeta(meta)
		if err != nil {
			return err
		}
		return tx.Bucket(bucketMeta).Put(keyMeta, v)
	})
}

// upgradeBucket rewrites every record of b with recode.
func (s *Store) upgradeBucket(b *bbolt.Bucket, recode func(name string, v []byte) ([]byte, error)) (int, error) {
	type kv struct{ k, v []byte }
	var out []kv
	err := b.ForEach(func(k, v []byte) error {
		nv, err := recode(string(k), v)
		if err != nil {
			return err
		}
		out = append(out, kv{bytes.Clone(k), nv})
		return nil
	})
	if err != nil {
		return 0, err
	}
	for _, e := range out {
		if err := b.Put(e.k, e.v); err != nil {
			return 0, err
		}
	}
	return len(out), nil
}

// Upgraded is how many records of a file of format 1 (which authenticated
// only the secrets) were accepted as they were and authenticated at open.
func (s *Store) Upgraded() int { return s.upgraded }

// OldKeyRecords counts the records holding anything sealed with a key other
// than the sealing key: while it is above 0, the key file must keep the
// older keys.
func (s *Store) OldKeyRecords(ctx context.Context) (int, error) {
	n := 0
	err := s.view(func(tx *bbolt.Tx) error {
		for _, b := range []struct {
			name  []byte
			stale func([]byte) bool
		}{{bucketConnections, s.codec.ConnectionNeedsReseal}, {bucketDeleting, s.codec.ConnectionNeedsReseal}, {bucketTokens, s.codec.TokensNeedsReseal}} {
			err := tx.Bucket(b.name).ForEach(func(_, v []byte) error {
				if b.stale(v) {
					n++
				}
				return ctx.Err()
			})
			if err != nil {
				return err
			}
		}
		return nil
	})
	return n, err
}

// Close waits for queued writes and closes the file.
func (s *Store) Close() error {
	var err error
	s.closeOnce.Do(func() {
		close(s.quit)
		<-s.done
		s.mu.Lock()
		defer s.mu.Unlock()
		if s.broken == nil {
			err = s.db.Close()
		}
	})
	return err
}

// CommitStats returns how many transactions (each one fsync) carried how
// many writes since Open.
func (s *Store) CommitStats() (commits, writes int64) {
	return s.commits.Load(), s.written.Load()
}

// Path is the data file's path.
func (s *Store) Path() string { return s.path }

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
		err = s.update(func(tx *bbolt.Tx) error {
			for _, r := range batch {
				r.err = r.fn(tx)
			}
			return nil
		})
		if err == nil {
			err = s.checkFile()
		} else if !errors.Is(err, storage.ErrCorrupt) {
			err = fmt.Errorf("storage: commit: %w", err)
		}
	}
	var werr error
	if err == nil && erased(batch) {
		werr = s.wipe()
	}
	s.health.noteWrite(err)
	for _, r := range batch {
		switch {
		case err != nil:
			r.err = err
		case r.wipe && r.err == nil && werr != nil:
			// Erased, but the bytes may linger in free pages.
			r.err = werr
		}
		close(r.done)
	}
}

// update runs fn in a write transaction of the current file, under guard.
func (s *Store) update(fn func(tx *bbolt.Tx) error) error {
	s.mu.RLock()
	defer s.mu.RUnlock()
	if s.broken != nil {
		return s.broken
	}
	return s.guard(func() error { return s.db.Update(fn) })
}

// erased reports whether the batch erased a record.
func erased(batch []*writeReq) bool {
	for _, r := range batch {
		if r.wipe && r.err == nil {
			return true
		}
	}
	return false
}

// write queues fn for the group committer and waits for its durable commit.
// The wait ignores ctx once the write is queued: a caller cannot learn
// whether a write it abandoned landed, so it never abandons one.
func (s *Store) write(ctx context.Context, fn func(tx *bbolt.Tx) error) error {
	return s.queue(ctx, &writeReq{fn: fn, done: make(chan struct{})})
}

func (s *Store) queue(ctx context.Context, r *writeReq) error {
	if err := ctx.Err(); err != nil {
		return err
	}
	select {
	case <-s.quit:
		return storage.ErrClosed
	default:
	}
	select {
	case s.writes <- r:
	case <-s.quit:
		return storage.ErrClosed
	case <-ctx.Done():
		return ctx.Err()
	}
	select {
	case <-r.done:
	case <-s.done:
		// The committer has gone. It commits what was queued before it
		// saw Close; a write queued after that is never made.
		select {
		case <-r.done:
		default:
			return storage.ErrClosed
		}
	}
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
		if tx.Bucket(bucketDeleting).Get(key) != nil {
			return fmt.Errorf("%w: %s (its delete is being finished)", storage.ErrAlreadyExists, c.Name)
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
		return s.resealIn(tx.Bucket(bucketTokens), key, s.codec.TokensNeedsReseal, s.codec.ResealTokens)
	})
	if err != nil {
		return nil, err
	}
	return c, nil
}

// MarkDeleting starts a delete durably: the connection record (whose
// Revision must equal revision unless it is 0) leaves the live records with
// its DeleteTime set, so every read treats it as gone, while it and its
// tokens stay stored until [Store.DeleteConnection] erases them. LoadAll
// reports it, so a delete interrupted by a crash is finished at the next
// start.
func (s *Store) MarkDeleting(ctx context.Context, name string, revision int64) error {
	key := []byte(name)
	return s.write(ctx, func(tx *bbolt.Tx) error {
		v := tx.Bucket(bucketConnections).Get(key)
		if v == nil {
			return fmt.Errorf("%w: %s", storage.ErrNotFound, name)
		}
		c, err := s.decodeConnection(key, v)
		if err != nil {
			return err
		}
		if revision != 0 && c.Revision != revision {
			return fmt.Errorf("%w: %s is at revision %d, not %d", storage.ErrConflict, name, c.Revision, revision)
		}
		c.DeleteTime = s.now()
		dv, err := s.codec.EncodeConnection(c)
		if err != nil {
			return err
		}
		if err := tx.Bucket(bucketDeleting).Put(key, dv); err != nil {
			return err
		}
		return tx.Bucket(bucketConnections).Delete(key)
	})
}

// DeleteConnection erases a connection and its tokens, or finishes a delete
// [Store.MarkDeleting] started. A revision other than 0 must match the
// stored one. The erased records' bytes are wiped from the file before it
// returns: the file is compacted into a copy that replaces it, since bbolt
// leaves freed pages' bytes in place. While a long read is open (a
// snapshot, see [Store.longView]) the wipe waits for the last one to end,
// and the delete returns without waiting for it: see [Store.wipe].
func (s *Store) DeleteConnection(ctx context.Context, name string, revision int64) error {
	key := []byte(name)
	return s.queue(ctx, &writeReq{wipe: true, done: make(chan struct{}), fn: func(tx *bbolt.Tx) error {
		from := tx.Bucket(bucketConnections)
		v := from.Get(key)
		if v == nil {
			from = tx.Bucket(bucketDeleting)
			v = from.Get(key)
		}
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
		if err := from.Delete(key); err != nil {
			return err
		}
		if err := tx.Bucket(bucketMeta).Put(keyWipe, []byte{1}); err != nil {
			return err
		}
		return tx.Bucket(bucketTokens).Delete(key)
	}})
}

// compactSuffix names, next to the data file, the copy a wipe makes.
const compactSuffix = ".compact"

// wipe replaces the file with a compacted copy, which holds the live
// records only: the bytes of erased records (and of every earlier version
// of any record) left in the old file's free pages go with it. It runs on
// the committer, so no write is in flight, and waits for the short reads
// (each holds the read lock for its transaction).
//
// Closing the file waits for every open read transaction, and every read
// and write waits behind the wipe: a long read (a backup streaming for
// minutes) would stall the store. So while one is open the wipe is owed
// instead: the erase's wipe mark is durable already, the erase answers,
// and the last long read to end runs the wipe (see [Store.endLong]); a
// crash or Close before that leaves the mark, and the next open wipes.
func (s *Store) wipe() error {
	if s.deferWipe() {
		return nil
	}
	tmp := s.path + compactSuffix
	if err := os.Remove(tmp); err != nil && !errors.Is(err, os.ErrNotExist) {
		return fmt.Errorf("storage: wipe: %w", err)
	}
	if err := s.compactTo(tmp); err != nil {
		os.Remove(tmp)
		return fmt.Errorf("storage: wipe: %w", err)
	}
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.broken != nil {
		os.Remove(tmp)
		return s.broken
	}
	// A long read begins under the read lock: none begins from here on,
	// and one that began during the compaction defers the wipe again.
	if s.deferWipe() {
		os.Remove(tmp)
		return nil
	}
	if err := s.db.Close(); err != nil {
		s.broken = fmt.Errorf("storage: wipe: close: %w", err)
		return s.broken
	}
	err := os.Rename(tmp, s.path)
	if err == nil {
		err = syncDir(filepath.Dir(s.path))
	}
	opts := s.opts
	opts.Populate = false
	db, file, oerr := openDB(s.path, opts)
	var ident os.FileInfo
	if oerr == nil {
		ident, oerr = file.Stat()
	}
	if oerr != nil {
		if db != nil {
			db.Close()
		}
		s.broken = fmt.Errorf("storage: wipe: reopen %s: %w", s.path, oerr)
		return s.broken
	}
	s.db, s.ident, s.fd = db, ident, file.Fd()
	if err != nil {
		return fmt.Errorf("storage: wipe: %w", err)
	}
	s.lmu.Lock()
	s.owed = false
	s.lmu.Unlock()
	return nil
}

// deferWipe reports whether a long read is open, and if so records the
// wipe as owed.
func (s *Store) deferWipe() bool {
	s.lmu.Lock()
	defer s.lmu.Unlock()
	if s.long > 0 {
		s.owed = true
	}
	return s.long > 0
}

// longView runs fn in a read transaction that does not hold the store's
// read lock while it runs, for reads that last (a backup streams a
// snapshot at the pace of its client): a wipe waiting for the write lock
// would otherwise stall every read and write queued behind it. The file
// handle is taken under the read lock; while the transaction is open,
// wipe leaves the file in place (see [Store.wipe]).
func (s *Store) longView(fn func(tx *bbolt.Tx) error) error {
	tx, err := s.beginLong()
	if err != nil {
		return err
	}
	defer s.endLong()
	defer tx.Rollback()
	return s.guard(func() error { return fn(tx) })
}

// beginLong opens a long read's transaction on the current file and
// counts it.
func (s *Store) beginLong() (*bbolt.Tx, error) {
	s.mu.RLock()
	defer s.mu.RUnlock()
	if s.broken != nil {
		return nil, s.broken
	}
	var tx *bbolt.Tx
	err := s.guard(func() error {
		var err error
		tx, err = s.db.Begin(false)
		return err
	})
	if err != nil {
		return nil, err
	}
	s.lmu.Lock()
	s.long++
	s.lmu.Unlock()
	return tx, nil
}

// endLong uncounts a long read whose transaction has ended. The last one
// to end runs an owed wipe through the committer and waits for it, so
// that when a snapshot returns, what was erased while it ran is gone from
// the file. A wipe that fails reports to [Store.Healthy] as any failed
// write; the read, which succeeded, does not fail for it.
func (s *Store) endLong() {
	s.lmu.Lock()
	s.long--
	run := s.long == 0 && s.owed
	s.lmu.Unlock()
	if !run {
		return
	}
	s.queue(context.Background(), &writeReq{wipe: true, done: make(chan struct{}), fn: func(*bbolt.Tx) error { return nil }})
}

// compactTo copies the live records into a new file at tmp and syncs it.
func (s *Store) compactTo(tmp string) error {
	dst, err := bbolt.Open(tmp, 0o600, &bbolt.Options{Timeout: s.opts.LockTimeout})
	if err != nil {
		return err
	}
	s.mu.RLock()
	err = s.guard(func() error { return bbolt.Compact(dst, s.db, 64<<20) })
	s.mu.RUnlock()
	if err == nil {
		// The copy is the wiped file: it carries no pending wipe.
		err = dst.Update(func(tx *bbolt.Tx) error { return tx.Bucket(bucketMeta).Delete(keyWipe) })
	}
	if cerr := dst.Close(); err == nil {
		err = cerr
	}
	return err
}

func syncDir(dir string) error {
	d, err := os.Open(dir)
	if err != nil {
		return err
	}
	defer d.Close()
	return d.Sync()
}

// GetTokens reads a connection's token state.
func (s *Store) GetTokens(ctx context.Context, name string) (*storage.Tokens, error) {
	var t *storage.Tokens
	err := s.view(func(tx *bbolt.Tx) error {
		v := tx.Bucket(bucketTokens).Get([]byte(name))
		if v == nil || tx.Bucket(bucketConnections).Get([]byte(name)) == nil {
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
// resurrects one. While keys rotate, the connection record is resealed with
// the sealing key in the same transaction if it holds anything sealed with
// an older one: a connection's regular refreshes move all its secrets to
// the new key.
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
		if err := s.resealIn(tx.Bucket(bucketConnections), key, s.codec.ConnectionNeedsReseal, s.codec.ResealConnection); err != nil {
			return err
		}
		return tx.Bucket(bucketTokens).Put(key, tv)
	})
}

// resealIn rewrites the record under key in b with the sealing key if
// stale says it holds anything sealed with an older one. A record that
// fails its check is left as it is: the write at hand does not depend on it.
func (s *Store) resealIn(b *bbolt.Bucket, key []byte, stale func([]byte) bool, reseal func(string, []byte) ([]byte, error)) error {
	if !s.codec.Rotating() {
		return nil
	}
	v := b.Get(key)
	if v == nil || !stale(v) {
		return nil
	}
	nv, err := reseal(string(key), v)
	if err != nil {
		return nil
	}
	return b.Put(key, nv)
}

// LoadAll calls fn for every connection with its token state, and for
// every delete in progress (DeleteTime set) with what it still holds. Records are
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
			for _, bucket := range [][]byte{bucketConnections, bucketDeleting} {
				cur := tx.Bucket(bucket).Cursor()
				for k, v := cur.First(); k != nil; k, v = cur.Next() {
					select {
					case items <- item{k, v, tokens.Get(k)}:
					case err := <-errc:
						return err
					case <-ctx.Done():
						return ctx.Err()
					}
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
