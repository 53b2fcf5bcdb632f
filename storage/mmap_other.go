//go:build !linux

package storage

const mapPopulate = 0
