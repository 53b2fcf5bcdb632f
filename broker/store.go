package broker

import (
	"context"

	"tokenbroker/storage"
)

// Store is what the broker needs of durable storage. Every write returns
// only after it is durable. Implementations: the bolt.Store of
// tokenbroker/storage/bolt (one process) and the etcd.Store of
// tokenbroker/storage/etcd (replicas); the broker never imports either.
type Store interface {
	CreateConnection(ctx context.Context, c *storage.Connection, t *storage.Tokens) (*storage.Connection, error)
	GetConnection(ctx context.Context, name string) (*storage.Connection, error)
	ListConnections(ctx context.Context, prefix, after string, limit int) ([]*storage.Connection, error)
	UpdateConnection(ctx context.Context, c *storage.Connection, t *storage.Tokens) (*storage.Connection, error)
	DeleteConnection(ctx context.Context, name string, revision int64) error
	MarkDeleting(ctx context.Context, name string, revision int64) error
	GetTokens(ctx context.Context, name string) (*storage.Tokens, error)
	PutTokens(ctx context.Context, name string, t *storage.Tokens) error
	LoadAll(ctx context.Context, fn func(*storage.Connection, *storage.Tokens) error) error
}

// Locker serializes a connection's upstream token requests across
// replicas: while the lock is held no other replica talks to the
// connection's token endpoint. Implementation: the etcd store.
type Locker interface {
	Lock(ctx context.Context, name string) (unlock func(), err error)
}

// Watcher reports changes made by any replica, so that each replica's
// in-memory tokens stay coherent. Implementation: the etcd store.
type Watcher interface {
	Watch(ctx context.Context, fn func(storage.Change))
}
