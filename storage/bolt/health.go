package bolt

import (
	"context"
	"errors"
	"fmt"
	"io/fs"
	"os"
	"sync"

	bbolt "go.etcd.io/bbolt"

	"tokenbroker/storage"
)

// A store can lose the ability to keep what it is given while the process
// runs: the data file deleted or replaced under it (every write would then
// land in a file no restart finds), a damaged page found while serving, or
// a disk that refuses writes. [Store.Healthy] says which, so the server can
// stop taking traffic and say why, and the store refuses the writes it
// knows would be lost.

// health is what the store learnt from its own reads and writes.
type health struct {
	mu        sync.Mutex
	corrupt   error // a damaged page was read; never cleared
	lastWrite error // the last commit's failure; cleared by a commit that succeeds
}

func (h *health) noteCorrupt(err error) {
	h.mu.Lock()
	defer h.mu.Unlock()
	if h.corrupt == nil {
		h.corrupt = err
	}
}

func (h *health) noteWrite(err error) {
	if errors.Is(err, storage.ErrCorrupt) {
		h.noteCorrupt(err)
	}
	h.mu.Lock()
	defer h.mu.Unlock()
	h.lastWrite = err
}

func (h *health) state() (corrupt, lastWrite error) {
	h.mu.Lock()
	defer h.mu.Unlock()
	return h.corrupt, h.lastWrite
}

// Healthy reports why the store cannot keep what it is given, or nil:
//   - the path no longer names the open file (deleted, renamed away or
//     replaced): [storage.ErrFileGone];
//   - a damaged page was read since Open: [storage.ErrCorrupt];
//   - the last write failed, and so does a probe write.
//
// It costs one stat of the path while all is well. It is meant to be
// polled (say once a second) by whatever reports the process's health.
func (s *Store) Healthy() error {
	corrupt, lastWrite := s.health.state()
	if corrupt != nil {
		return corrupt
	}
	if err := s.checkFile(); err != nil {
		return err
	}
	if lastWrite == nil {
		return nil
	}
	return s.probe()
}

// probeSize is larger than any record the store keeps.
const probeSize = 64 << 10

// probe finds out, while writes are failing, whether the disk takes them
// again, so that health comes back even when no caller writes: it stores
// a record larger than any real one, so the file must have room to grow
// as a real write would need, then erases it. An empty commit would not
// do: it rewrites pages the file already has, and passes on a full disk.
func (s *Store) probe() error {
	ctx := context.Background()
	v := make([]byte, probeSize)
	if err := s.write(ctx, func(tx *bbolt.Tx) error { return tx.Bucket(bucketMeta).Put(keyProbe, v) }); err != nil {
		return err
	}
	return s.write(ctx, func(tx *bbolt.Tx) error { return tx.Bucket(bucketMeta).Delete(keyProbe) })
}

// refuseWrites returns why no write can be kept, or nil.
func (s *Store) refuseWrites() error {
	if corrupt, _ := s.health.state(); corrupt != nil {
		return corrupt
	}
	return s.checkFile()
}

// checkFile returns [storage.ErrFileGone] when the path no longer names the
// open file (device and inode differ, or nothing is there).
func (s *Store) checkFile() error {
	s.mu.RLock()
	ident, fd := s.ident, s.fd
	s.mu.RUnlock()
	info, err := os.Stat(s.path)
	if err == nil && os.SameFile(info, ident) {
		return nil
	}
	what := "deleted or renamed"
	switch {
	case err == nil:
		what = "replaced by another file"
	case !errors.Is(err, fs.ErrNotExist):
		what = "made unreachable (" + err.Error() + ")"
	}
	return fmt.Errorf("%w: %s was %s while open; writes are refused because a restart would not find them (until this process exits, the open file can be copied back from /proc/%d/fd/%d)",
		storage.ErrFileGone, s.path, what, os.Getpid(), fd)
}

// guard runs fn under the package's guard (see check.go) and remembers a
// damaged page for [Store.Healthy].
func (s *Store) guard(fn func() error) error {
	err := guard(s.path, fn)
	if errors.Is(err, storage.ErrCorrupt) {
		s.health.noteCorrupt(err)
	}
	return err
}

// view runs a read transaction of the current file (see wipe) under guard.
func (s *Store) view(fn func(tx *bbolt.Tx) error) error {
	s.mu.RLock()
	defer s.mu.RUnlock()
	if s.broken != nil {
		return s.broken
	}
	return s.guard(func() error { return s.db.View(fn) })
}
