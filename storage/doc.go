// Package storage is what tokenbroker keeps durably, apart from where it
// keeps it: the records ([Connection], [Tokens]), the errors every store
// returns ([ErrNotFound], [ErrConflict] …), the data key ([Keyring]) and
// the record codec ([Codec]) that seals secrets and tokens with it, bound
// to the connection's name and field, and authenticates every record whole
// under it ([ErrTampered] for one changed without the key), and the change
// feed's [Change].
//
// The backends live in their own packages: storage/bolt keeps one process's
// connections in a single bbolt file, storage/etcd keeps several replicas'
// in an etcd cluster. Both store only what a [Codec] produced, and both
// pass the contract in storage/storetest.
//
// This package must never import a backend, gRPC or the API messages,
// never know OAuth, never log, and never return a secret in an error.
package storage
