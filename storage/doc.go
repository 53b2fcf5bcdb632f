// Package storage keeps tokenbroker's connections and token chains durably.
//
// It defines the record types ([Connection], [Tokens]), an embedded
// implementation on a single bbolt file ([Open], [BoltStore]), and one on an
// etcd cluster for several replicas ([OpenEtcd], [EtcdStore]) that also
// offers cluster-wide per-connection locks and change watches. Secrets and
// tokens are sealed with an AEAD ([Keyring]) bound to the connection's
// resource name and field before they reach the file; records are
// protobuf-encoded with storage's own messages, apart from the API's.
//
// Every write is durable before the call returns: with bbolt, concurrent
// writes share one transaction and one fsync (a group committer); with
// etcd, each is a transaction committed by the cluster.
//
// This package must never know OAuth, gRPC or the API messages, never log,
// and never return a secret in an error.
package storage
