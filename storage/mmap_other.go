//go:build !linux

package storage

import bolt "go.etcd.io/bbolt"

const mapPopulate = 0

func dropMapped(*bolt.DB, *bolt.Tx) {}
