package bolt

import (
	"fmt"
	"os"
	"runtime"
	"runtime/debug"
	"strings"

	bbolt "go.etcd.io/bbolt"

	"tokenbroker/storage"
)

// bbolt trusts the pages of its file: a page that is not what bbolt wrote
// (a flipped bit, a torn copy, a truncated file) makes it panic with an
// assertion, or read past its memory map, which the Go runtime treats as
// a fatal fault. The store opens the file's pages only under guard, which
// turns both into [storage.ErrCorrupt], and checks the whole file once at
// Open (see inspect) so that damage is found before serving, not by the
// first caller whose record sits on a bad page.

// guard runs fn, turning a panic or a memory fault raised while it runs
// (on this goroutine) into [storage.ErrCorrupt]. bbolt rolls back a
// transaction a panic unwinds, so the store stays usable for other pages.
// The panic's value is kept in the message: were it a bug of the store's
// own rather than a damaged page, it would still be seen.
func guard(path string, fn func() error) (err error) {
	defer debug.SetPanicOnFault(debug.SetPanicOnFault(true))
	defer func() {
		if r := recover(); r != nil {
			err = corrupt(path, fmt.Sprint(r))
		}
	}()
	return fn()
}

// corrupt is the error for a damaged data file, on one line.
func corrupt(path, detail string) error {
	detail = strings.Join(strings.Fields(detail), " ")
	return fmt.Errorf("%w: %s: %s; restore it from a backup", storage.ErrCorrupt, path, detail)
}

// inspect checks, before anything is served, that every page the store
// will read is inside the file and holds what bbolt expects:
//   - the meta page's high-water mark is within the file (a truncated copy
//     would otherwise fault on the first read past its end);
//   - every key and value of every bucket can be reached and read;
//   - unless told to skip it, bbolt's own consistency check (tx.Check):
//     every page reachable exactly once, none both used and free, keys in
//     order. Only it finds a free list that names a page still in use,
//     which the next write would overwrite.
func inspect(db *bbolt.DB, file *os.File, path string, full bool) error {
	return guard(path, func() error {
		return db.View(func(tx *bbolt.Tx) error {
			if err := checkBounds(tx, file, path); err != nil {
				return err
			}
			if err := walk(tx, path); err != nil {
				return err
			}
			if full {
				return checkConsistency(tx, path)
			}
			return nil
		})
	})
}

// checkBounds checks that the pages the meta page says are in use are all
// inside the file.
func checkBounds(tx *bbolt.Tx, file *os.File, path string) error {
	info, err := file.Stat()
	if err != nil {
		return fmt.Errorf("storage: stat %s: %w", path, err)
	}
	if tx.Size() > info.Size() {
		return corrupt(path, fmt.Sprintf("its pages end at byte %d but the file has %d bytes (truncated?)", tx.Size(), info.Size()))
	}
	return nil
}

// walk reads every key and value of every bucket, touching the first and
// last byte of each so that a slice bbolt made from a damaged page faults
// here, under guard, rather than later in a decoding goroutine.
func walk(tx *bbolt.Tx, path string) error {
	var sum byte
	touch := func(b []byte) {
		if len(b) > 0 {
			sum ^= b[0] ^ b[len(b)-1]
		}
	}
	err := tx.ForEach(func(name []byte, b *bbolt.Bucket) error {
		touch(name)
		c := b.Cursor()
		for k, v := c.First(); k != nil; k, v = c.Next() {
			touch(k)
			touch(v)
		}
		return nil
	})
	runtime.KeepAlive(sum) // the reads must happen
	if err != nil {
		return corrupt(path, err.Error())
	}
	return nil
}

// checkConsistency runs bbolt's consistency check and reports its first
// finding. tx.Check recovers its own panics and reports them as findings.
func checkConsistency(tx *bbolt.Tx, path string) error {
	var first error
	n := 0
	for err := range tx.Check() {
		if first == nil {
			first = err
		}
		n++
	}
	if first == nil {
		return nil
	}
	if n > 1 {
		return corrupt(path, fmt.Sprintf("%v (and %d more findings)", first, n-1))
	}
	return corrupt(path, first.Error())
}
