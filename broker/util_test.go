package broker_test

import (
	"context"
	"net/http"
	"net/url"
	"strings"
	"sync"
	"testing"

	"tokenbroker/broker"
	"tokenbroker/storage"
)

type storageConn = storage.Connection

// spendRefreshToken uses a refresh token directly, as a request whose answer
// was lost in a crash would have.
func spendRefreshToken(t *testing.T, e *env, rt string) {
	t.Helper()
	form := url.Values{"grant_type": {"refresh_token"}, "refresh_token": {rt}, "client_id": {clientID}, "client_secret": {clientSecret}}
	resp, err := http.Post(e.http.URL+"/identity/connect/token", "application/x-www-form-urlencoded", strings.NewReader(form.Encode()))
	if err != nil {
		t.Fatal(err)
	}
	resp.Body.Close()
	if resp.StatusCode != 200 {
		t.Fatalf("spend: HTTP %d", resp.StatusCode)
	}
}

// onceAfter fails every PutTokens after the first (the intent) until healed.
type onceAfter struct {
	fs     *faultStore
	mu     sync.Mutex
	n      int
	healed bool
	inner  broker.Store
}

func (o *onceAfter) wrap(s broker.Store) broker.Store { o.inner = s; return o }

func (o *onceAfter) heal() { o.mu.Lock(); o.healed = true; o.mu.Unlock() }

func (o *onceAfter) PutTokens(ctx context.Context, name string, t *storage.Tokens) error {
	o.mu.Lock()
	o.n++
	fail := o.n > 1 && !o.healed
	o.mu.Unlock()
	if fail {
		return errDiskFull
	}
	return o.inner.PutTokens(ctx, name, t)
}

func (o *onceAfter) CreateConnection(ctx context.Context, c *storage.Connection, t *storage.Tokens) (*storage.Connection, error) {
	return o.inner.CreateConnection(ctx, c, t)
}

func (o *onceAfter) ListConnections(ctx context.Context, p, a string, l int) ([]*storage.Connection, error) {
	return o.inner.ListConnections(ctx, p, a, l)
}

func (o *onceAfter) UpdateConnection(ctx context.Context, c *storage.Connection, t *storage.Tokens) (*storage.Connection, error) {
	return o.inner.UpdateConnection(ctx, c, t)
}

func (o *onceAfter) DeleteConnection(ctx context.Context, n string, r int64) error {
	return o.inner.DeleteConnection(ctx, n, r)
}

func (o *onceAfter) LoadAll(ctx context.Context, fn func(*storage.Connection, *storage.Tokens) error) error {
	return o.inner.LoadAll(ctx, fn)
}

func (o *onceAfter) GetTokens(ctx context.Context, n string) (*storage.Tokens, error) {
	return o.inner.GetTokens(ctx, n)
}

func (o *onceAfter) GetConnection(ctx context.Context, n string) (*storage.Connection, error) {
	return o.inner.GetConnection(ctx, n)
}
