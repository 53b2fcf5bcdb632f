// Package storage keeps tokenbroker's connections and token chains durably.
//
// It defines the record types ([Connection], [Tokens]) and an embedded
// implementation on a single bbolt file ([Open], [BoltStore]). Secrets and
// tokens are sealed with an AEAD ([Keyring]) bound to the connection's
// resource name and field before they reach the file; records are
// protobuf-encoded with storage's own messages, apart from the API's.
//
// Every write is committed with fsync before the call returns; concurrent
// token writes share one transaction and one fsync (bbolt's batch).
//
// This package must never know OAuth, gRPC or the API messages, never log,
// and never return a secret in an error.
package storage
