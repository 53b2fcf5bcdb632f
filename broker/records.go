package broker

import "tokenbroker/storage"

// The broker's record types are storage's: aliases, so that the broker's
// callers (the gRPC server) name them through the broker alone and never
// import storage.
type (
	// Connection is a connection's configuration and credentials.
	Connection = storage.Connection
	// Tokens is a connection's token chain state.
	Tokens = storage.Tokens
	// Change is one change reported by a [Watcher].
	Change = storage.Change
)
