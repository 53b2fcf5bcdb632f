package broker_test

import (
	"context"
	"fmt"
	"net/http/httptest"
	"path/filepath"
	"sync/atomic"
	"testing"
	"time"

	"tokenbroker/broker"
	"tokenbroker/broker/acumaticatest"
	"tokenbroker/internal/testkit"
	"tokenbroker/storage"
	"tokenbroker/storage/bolt"
)

// missCounter counts GetAccessToken calls not served from memory.
type missCounter struct{ misses atomic.Int64 }

func (*missCounter) TokenRequest(string, string, time.Duration) {}
func (m *missCounter) CacheLookup(hit bool) {
	if !hit {
		m.misses.Add(1)
	}
}

// TestEconomyOfASimulatedDay runs a day on a fake clock: connections with
// 1 h access tokens, each asked for a token once a simulated minute, the
// maintenance pass run every minute, against the stand-in over HTTP and a
// real bbolt file. Every call is served from memory, nothing fails, no
// connection signs in with its password again, and each refreshes exactly
// once per 45 minutes (tokens in use are renewed at 75% of their life), with
// no refresh token spent twice. The counts are exact: the clock is fake and
// the maintenance pass settles before the next minute.
func TestEconomyOfASimulatedDay(t *testing.T) {
	const conns, hours = 40, 24
	clk := testkit.NewClock()
	idp := acumaticatest.New(acumaticatest.Options{Now: clk.Now, AccessTokenLifetime: time.Hour})
	idp.AddClient(clientID, clientSecret)
	idp.AddUser(username, password)
	hs := httptest.NewServer(idp.Handler())
	t.Cleanup(hs.Close)
	keys, err := storage.NewKeyring(make([]byte, 32))
	if err != nil {
		t.Fatal(err)
	}
	st, err := bolt.Open(filepath.Join(t.TempDir(), "economy.db"), bolt.Options{Keyring: keys})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { st.Close() })
	obs := &missCounter{}
	b, err := broker.New(broker.Options{Store: st, Now: clk.Now, TickInterval: -1, Observer: obs, AllowInsecureUpstream: true})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(b.Close)
	ctx := context.Background()
	names := make([]string, conns)
	for i := range names {
		names[i] = fmt.Sprintf("tenants/t%03d/connections/erp", i)
		if _, err := b.CreateConnection(ctx, &storage.Connection{
			Name: names[i], InstanceURL: hs.URL, ClientID: clientID, ClientSecret: clientSecret, Username: username, Password: password,
		}, false); err != nil {
			t.Fatal(err)
		}
	}
	created := idp.Counts()
	obs.misses.Store(0)
	var calls, failed int
	for range hours * 60 {
		clk.Advance(time.Minute)
		for _, name := range names {
			calls++
			if _, err := b.GetAccessToken(ctx, name, time.Minute, ""); err != nil {
				failed++
			}
		}
		b.Maintain()
		b.Settle()
	}
	end := idp.Counts()
	// One refresh every 45 minutes of the day, per connection.
	wantRefresh := conns * (hours * 60 / 45)
	for _, c := range []struct {
		what      string
		got, want int
	}{
		{"calls that failed", failed, 0},
		{"calls not served from memory", int(obs.misses.Load()), 0},
		{"password grants after the creating ones", end.PasswordGrants - created.PasswordGrants, 0},
		{"refresh grants", end.RefreshGrants - created.RefreshGrants, wantRefresh},
		{"invalid_grant answers", end.InvalidGrant - created.InvalidGrant, 0},
		{"refresh tokens reused", end.ReuseDetected, 0},
	} {
		if c.got != c.want {
			t.Errorf("%s over %d calls: %d, want %d", c.what, calls, c.got, c.want)
		}
	}
}
