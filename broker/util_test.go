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

// onceAfter fails every PutTokens after the first (the intent) until
// healed; every other method is the wrapped store's.
type onceAfter struct {
	broker.Store
	mu     sync.Mutex
	n      int
	healed bool
}

func (o *onceAfter) wrap(s broker.Store) broker.Store { o.Store = s; return o }

func (o *onceAfter) heal() { o.mu.Lock(); o.healed = true; o.mu.Unlock() }

func (o *onceAfter) PutTokens(ctx context.Context, name string, t *storage.Tokens) error {
	o.mu.Lock()
	o.n++
	fail := o.n > 1 && !o.healed
	o.mu.Unlock()
	if fail {
		return errDiskFull
	}
	return o.Store.PutTokens(ctx, name, t)
}
