//go:build !linux

package bolt

import (
	"os"

	bbolt "go.etcd.io/bbolt"
)

const mapPopulate = 0

func dropMapped(*bbolt.DB, *bbolt.Tx) {}

// releaseAbandoned closes the file of a bbolt.Open that panicked; see the
// Linux version.
func releaseAbandoned(f *os.File) { _ = f.Close() }
