//go:build !linux

package bolt

import bbolt "go.etcd.io/bbolt"

const mapPopulate = 0

func dropMapped(*bbolt.DB, *bbolt.Tx) {}
