//go:build !linux

package bolt

import (
	"os"

	bbolt "go.etcd.io/bbolt"
)

const mapPopulate = 0

// mmapReserve is bbolt's default: on Windows bbolt grows the file itself
// to the size of its map.
const mmapReserve = 0

func dropMapped(*bbolt.DB, *bbolt.Tx) {}

// releaseAbandoned closes the file of a bbolt.Open that panicked; see the
// Linux version.
func releaseAbandoned(f *os.File) { _ = f.Close() }
