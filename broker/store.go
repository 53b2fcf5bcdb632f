package broker

import (
	"context"

	"tokenbroker/storage"
)

// Store is what the broker needs of durable storage. Every write returns
// only after it is durable (fsync). Implementations: [storage.BoltStore].
type Store interface {
	CreateConnection(ctx context.Context, c *storage.Connection, t *storage.Tokens) (*storage.Connection, error)
	ListConnections(ctx context.Context, prefix, after string, limit int) ([]*storage.Connection, error)
	UpdateConnection(ctx context.Context, c *storage.Connection, t *storage.Tokens) (*storage.Connection, error)
	DeleteConnection(ctx context.Context, name string, revision int64) error
	PutTokens(ctx context.Context, name string, t *storage.Tokens) error
	LoadAll(ctx context.Context, fn func(*storage.Connection, *storage.Tokens) error) error
}
