package broker_test

import (
	"context"
	"path/filepath"
	"sync"
	"testing"
	"time"

	"tokenbroker/broker"
	"tokenbroker/broker/acumaticatest"
	"tokenbroker/storage"
	"tokenbroker/storage/bolt"
)

// benchBroker is a broker over a real bbolt file with one connection to the
// stand-in, on a clock the benchmark moves.
func benchBroker(b *testing.B, now func() time.Time) (*broker.Broker, *acumaticatest.Server) {
	b.Helper()
	idp := acumaticatest.New(acumaticatest.Options{Now: now})
	idp.AddClient(clientID, clientSecret)
	idp.AddUser(username, password)
	hs := idp.Start()
	b.Cleanup(hs.Close)
	keys, err := storage.NewKeyring(make([]byte, 32))
	if err != nil {
		b.Fatal(err)
	}
	st, err := bolt.Open(filepath.Join(b.TempDir(), "tokenbroker.db"), bolt.Options{Keyring: keys, Now: now})
	if err != nil {
		b.Fatal(err)
	}
	b.Cleanup(func() { st.Close() })
	// The stand-in serves on loopback.
	br, err := broker.New(broker.Options{Store: st, Now: now, TickInterval: -1, AllowInsecureUpstream: true})
	if err != nil {
		b.Fatal(err)
	}
	b.Cleanup(br.Close)
	if _, err := br.CreateConnection(context.Background(), &storage.Connection{Name: connName, InstanceURL: hs.URL,
		ClientID: clientID, ClientSecret: clientSecret, Username: username, Password: password}, false); err != nil {
		b.Fatal(err)
	}
	return br, idp
}

// BenchmarkCachedToken is the cached path: a held token, many callers.
func BenchmarkCachedToken(b *testing.B) {
	br, _ := benchBroker(b, time.Now)
	ctx := context.Background()
	b.ReportAllocs()
	b.RunParallel(func(pb *testing.PB) {
		for pb.Next() {
			if _, err := br.GetAccessToken(ctx, connName, time.Minute, ""); err != nil {
				b.Fatal(err)
			}
		}
	})
}

// BenchmarkHerd is 100 callers on an expired token: one shared refresh
// serves them all.
func BenchmarkHerd(b *testing.B) {
	var mu sync.Mutex
	t := time.Date(2026, 11, 24, 9, 0, 0, 0, time.UTC)
	now := func() time.Time { mu.Lock(); defer mu.Unlock(); return t }
	br, idp := benchBroker(b, now)
	ctx := context.Background()
	for b.Loop() {
		mu.Lock()
		t = t.Add(2 * time.Hour)
		mu.Unlock()
		var wg sync.WaitGroup
		for range 100 {
			wg.Go(func() {
				if _, err := br.GetAccessToken(ctx, connName, time.Minute, ""); err != nil {
					b.Error(err)
				}
			})
		}
		wg.Wait()
	}
	if c := idp.Counts(); c.RefreshGrants != b.N {
		b.Errorf("refresh grants = %d for %d herds", c.RefreshGrants, b.N)
	}
}
