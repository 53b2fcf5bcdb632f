package broker

import (
	"context"
	"errors"
	"fmt"
	"sync"

	"tokenbroker/storage"
)

// A delete runs in three steps, each durable before the next: the store
// marks the connection deleting (from then on it is gone for every caller
// and every restart), the refresh token is revoked and the session signed
// out upstream, and the records are erased. A crash between the steps never
// brings the connection back: the next start finds the mark and finishes
// the delete (revoking again, which is harmless) before anything reads it.

// DeleteConnection deletes a connection: durably marked first, then its
// refresh token revoked and its session signed out upstream (best effort),
// then its records and every stored secret erased. etag, when set, must
// match.
func (b *Broker) DeleteConnection(ctx context.Context, name, etagIn string) error {
	c, err := b.lookup(name)
	if err != nil {
		return err
	}
	if etagIn != "" {
		if _, ok := ParseETag(etagIn); !ok {
			return invalid(FieldViolation{Field: "etag", Description: "is not an etag this service issued"})
		}
	}
	return b.withTurn(ctx, c, func() error {
		c.mu.Lock()
		cfg, tok, pending, setAside, deleted := c.cfg.Clone(), c.committed.Clone(), c.rt.pending, c.rt.setAside, c.deleted
		c.mu.Unlock()
		if deleted {
			return notFound(name)
		}
		if etagIn != "" && etagIn != etag(cfg) {
			return newError(ErrConflict, ReasonEtagMismatch, name, "etag %s does not match the current %s", etagIn, etag(cfg))
		}
		if err := b.store.MarkDeleting(context.WithoutCancel(ctx), name, cfg.Revision); err != nil {
			if errors.Is(err, storage.ErrNotFound) {
				return notFound(name)
			}
			return storageError(name, err)
		}
		b.forget(c)
		if pending != nil {
			b.signOut(ctx, cfg, pending.RefreshToken, "")
		}
		b.signOut(ctx, cfg, setAside, "")
		return b.erase(ctx, cfg, tok)
	})
}

// forget drops a connection marked deleting from memory: no caller is
// served from it again.
func (b *Broker) forget(c *conn) {
	c.mu.Lock()
	c.markDeletedLocked()
	c.mu.Unlock()
	if b.loading.Load() {
		b.tombs.Store(c.name, struct{}{})
	}
	b.conns.Delete(c.name)
}

// erase finishes a delete marked in the store: it revokes and signs out
// the chain tok, then erases the records. A record already erased (by
// another replica finishing the same delete) is done.
func (b *Broker) erase(ctx context.Context, cfg *storage.Connection, tok *storage.Tokens) error {
	b.signOut(ctx, cfg, tok.RefreshToken, tok.AccessToken)
	err := b.store.DeleteConnection(context.WithoutCancel(ctx), cfg.Name, 0)
	if err != nil && !errors.Is(err, storage.ErrNotFound) {
		b.log.Error("connection deleted, but erasing its records failed; the next start finishes it",
			"connection", cfg.Name, "error", storageMessage(err))
		return storageError(cfg.Name, fmt.Errorf("deleted, but its records are not erased yet (the next start erases them): %w", err))
	}
	b.log.Info("connection deleted", "connection", cfg.Name)
	return nil
}

// unfinished collects, while [Broker.Load] runs, the deletes a crash
// interrupted.
type unfinished struct {
	mu   sync.Mutex
	cfgs []*storage.Connection
	toks []*storage.Tokens
}

func (u *unfinished) add(cfg *storage.Connection, tok *storage.Tokens) {
	u.mu.Lock()
	defer u.mu.Unlock()
	u.cfgs = append(u.cfgs, cfg)
	u.toks = append(u.toks, tok)
}

// finish completes the interrupted deletes: revoke again (the first try
// may or may not have reached upstream), then erase.
func (u *unfinished) finish(ctx context.Context, b *Broker) {
	for i, cfg := range u.cfgs {
		b.log.Warn("finishing a delete interrupted at last stop", "connection", cfg.Name,
			"marked", cfg.DeleteTime)
		b.erase(ctx, cfg, u.toks[i])
	}
}
