package storage

import "errors"

var (
	// ErrNotFound means no record exists under the name.
	ErrNotFound = errors.New("storage: not found")
	// ErrAlreadyExists means a record exists under the name.
	ErrAlreadyExists = errors.New("storage: already exists")
	// ErrConflict means the record changed since it was read (revision mismatch).
	ErrConflict = errors.New("storage: revision conflict")
	// ErrInUse means another process holds the data file.
	ErrInUse = errors.New("storage: data file is in use by another process")
	// ErrNotDataFile means the file is corrupt or not a tokenbroker data file.
	ErrNotDataFile = errors.New("storage: not a tokenbroker data file")
	// ErrCorrupt means the data file's pages are damaged (a flipped bit, a
	// torn or truncated copy): it must be restored from a backup. A store
	// refuses such a file at open without modifying it.
	ErrCorrupt = errors.New("storage: data file is corrupt")
	// ErrFileGone means the data file's path no longer names the file the
	// store has open (deleted, renamed away or replaced): a write would
	// land where no restart finds it, so writes are refused.
	ErrFileGone = errors.New("storage: data file deleted or replaced while open")
	// ErrWrongKey means the key cannot open what the file holds.
	ErrWrongKey = errors.New("storage: wrong key for data file")
	// ErrLockLost means a token write made under a connection's lock was
	// refused because the lock had lapsed and may be held elsewhere.
	ErrLockLost = errors.New("storage: connection lock lost")
	// ErrClosed means the store was closed.
	ErrClosed = errors.New("storage: closed")
)

// ErrTampered means a stored record fails its integrity check: it was
// changed by someone without the data key, and is never used.
var ErrTampered = errors.New("storage: record fails its integrity check")
