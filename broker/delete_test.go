package broker_test

import (
	"context"
	"errors"
	"testing"

	"tokenbroker/broker"
	"tokenbroker/storage"
)

// eraseFails is a store whose erase fails: a delete stops right after its
// durable mark and the upstream revocation, as a crash there would.
type eraseFails struct{ broker.Store }

func (eraseFails) DeleteConnection(context.Context, string, int64) error { return errDiskFull }

// TestInterruptedDeleteIsFinishedAtStart stops a delete after the mark and
// the revocation, before the erase, then restarts on the same bbolt file:
// the connection is never listed or served again, the restart revokes
// again and erases it.
func TestInterruptedDeleteIsFinishedAtStart(t *testing.T) {
	e := newEnv(t)
	e.create()
	e.mustToken()
	o := e.opts
	o.Store = eraseFails{e.store}
	b, err := broker.New(o)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := b.Load(context.Background()); err != nil {
		t.Fatal(err)
	}
	if err := b.DeleteConnection(context.Background(), connName, ""); !errors.Is(err, broker.ErrStorage) {
		t.Fatalf("delete with a failing erase: %v; want a storage error", err)
	}
	if _, err := b.GetAccessToken(context.Background(), connName, 0, ""); !errors.Is(err, broker.ErrNotFound) {
		t.Errorf("token after the interrupted delete: %v; want not found", err)
	}
	b.Close()
	revoked := e.idp.Counts().Revocations
	if revoked == 0 {
		t.Fatal("sanity: the delete did not revoke")
	}

	e.restart()
	if views, _, err := e.b.ListConnections(context.Background(), "tenants/", "", 10, nil); err != nil || len(views) != 0 {
		t.Errorf("listed after restart: %d connections, %v", len(views), err)
	}
	if _, err := e.b.GetAccessToken(context.Background(), connName, 0, ""); !errors.Is(err, broker.ErrNotFound) {
		t.Errorf("token after restart: %v; want not found", err)
	}
	if got := e.idp.Counts().Revocations; got <= revoked {
		t.Errorf("the restart did not revoke again (%d revocations, %d before)", got, revoked)
	}
	n := 0
	if err := e.store.LoadAll(context.Background(), func(*storage.Connection, *storage.Tokens) error { n++; return nil }); err != nil || n != 0 {
		t.Errorf("store after restart: %d records, %v; want the delete finished", n, err)
	}
}
