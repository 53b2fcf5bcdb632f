package broker

import (
	"bytes"
	"context"
	"log/slog"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"tokenbroker/storage"
	"tokenbroker/storage/bolt"
)

// TestALeftoverIntentIsReportedOnceWhoeverLoadsTheConnection: Load and a
// caller's lazy load (loadOne) can both read a connection while the broker
// loads; only the one whose state is kept marks it recovering and logs the
// token request left in flight. Either order gives one line.
func TestALeftoverIntentIsReportedOnceWhoeverLoadsTheConnection(t *testing.T) {
	for _, lazyFirst := range []bool{true, false} {
		st := openStore(t)
		const name = "tenants/t/connections/erp"
		now := time.Now()
		ctx := context.Background()
		if _, err := st.CreateConnection(ctx, testConnection(name, now), &storage.Tokens{Generation: 3, RefreshToken: "rt-3",
			IntentGrant: "refresh_token", IntentGeneration: 3, IntentTime: now}); err != nil {
			t.Fatal(err)
		}
		// The loads run one after the other here: one writer at a time.
		var logs bytes.Buffer
		b, err := New(Options{Store: st, TickInterval: -1, AllowInsecureUpstream: true, Logger: slog.New(slog.NewTextHandler(&logs, nil))})
		if err != nil {
			t.Fatal(err)
		}
		var lazy *conn
		if lazyFirst {
			lazy = b.loadOne(ctx, name)
		}
		if _, err := b.Load(ctx); err != nil {
			t.Fatal(err)
		}
		if !lazyFirst {
			b.loading.Store(true) // as if a caller's read had raced the end of Load
			lazy = b.loadOne(ctx, name)
		}
		v, _ := b.conns.Load(name)
		if lazy == nil || v.(*conn) != lazy || !lazy.rt.recovering {
			t.Errorf("lazy first %v: the caller got %p, the broker keeps %p (recovering %v)", lazyFirst, lazy, v, lazy != nil && lazy.rt.recovering)
		}
		if n := strings.Count(logs.String(), "token request was in flight at last stop"); n != 1 {
			t.Errorf("lazy first %v: the leftover intent was logged %d times, want once:\n%s", lazyFirst, n, logs.String())
		}
		b.Close()
	}
}

// TestALazyLoadDoesNotBringBackADeletedConnection: a connection deleted
// while Load runs is not brought back by a caller's lazy load.
func TestALazyLoadDoesNotBringBackADeletedConnection(t *testing.T) {
	st := openStore(t)
	const name = "tenants/t/connections/erp"
	now := time.Now()
	cfg := testConnection(name, now)
	if _, err := st.CreateConnection(context.Background(), cfg, &storage.Tokens{}); err != nil {
		t.Fatal(err)
	}
	b, err := New(Options{Store: st, TickInterval: -1, AllowInsecureUpstream: true})
	if err != nil {
		t.Fatal(err)
	}
	defer b.Close()
	// The delete's tomb, as DeleteConnection leaves it while loading.
	b.tombs.Store(name, struct{}{})
	if c := b.admit(cfg, &storage.Tokens{}); c != nil {
		t.Errorf("a deleted connection was admitted")
	}
	if _, ok := b.conns.Load(name); ok {
		t.Errorf("a deleted connection is live again")
	}
}

// openStore opens a bbolt store in a temporary directory, closed when the
// test ends.
func openStore(t *testing.T) *bolt.Store {
	t.Helper()
	keys, err := storage.NewKeyring(make([]byte, 32))
	if err != nil {
		t.Fatal(err)
	}
	st, err := bolt.Open(filepath.Join(t.TempDir(), "db"), bolt.Options{Keyring: keys})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { st.Close() })
	return st
}

// testConnection is a stored connection's configuration on a fixed instance.
func testConnection(name string, now time.Time) *storage.Connection {
	return &storage.Connection{Name: name, InstanceURL: "https://erp.example.com",
		ClientID: "88358B02-A48D-A50E-F710-39C1636C30F6@T", ClientSecret: "secret", Username: "u", Password: "pw",
		CreateTime: now, UpdateTime: now}
}
