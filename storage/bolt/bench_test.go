package bolt_test

import (
	"context"
	"fmt"
	"path/filepath"
	"strings"
	"sync"
	"testing"

	"tokenbroker/storage"
	"tokenbroker/storage/bolt"
)

// BenchmarkStartup prices the checks Open makes against the rest of a
// start, LoadAll of every connection, on one file in one run: compare the
// ns/op of open-default (every check) and open-skipfullcheck with
// load-all. Run with -benchtime=5x; filling the file takes a while.
func BenchmarkStartup(b *testing.B) {
	const n = 100_000
	path := filepath.Join(b.TempDir(), "tokenbroker.db")
	keys := keyring(b, key(1))
	fill(b, path, keys, n)
	b.Run("load-all", func(b *testing.B) {
		s, err := bolt.Open(path, bolt.Options{Keyring: keys})
		if err != nil {
			b.Fatal(err)
		}
		defer s.Close()
		b.ResetTimer()
		for range b.N {
			if err := s.LoadAll(context.Background(), func(*storage.Connection, *storage.Tokens) error { return nil }); err != nil {
				b.Fatal(err)
			}
		}
	})
	for _, skip := range []bool{false, true} {
		name := "open-default"
		if skip {
			name = "open-skipfullcheck"
		}
		b.Run(name, func(b *testing.B) {
			for range b.N {
				s, err := bolt.Open(path, bolt.Options{Keyring: keys, SkipFullCheck: skip})
				if err != nil {
					b.Fatal(err)
				}
				b.StopTimer()
				s.Close()
				b.StartTimer()
			}
		})
	}
}

// fill writes n connections with tokens of realistic size, 256 at a time.
func fill(b *testing.B, path string, keys *storage.Keyring, n int) {
	s, err := bolt.Open(path, bolt.Options{Keyring: keys})
	if err != nil {
		b.Fatal(err)
	}
	defer s.Close()
	tok := sampleToken()
	tok.AccessToken = strings.Repeat("a", 900)
	var wg sync.WaitGroup
	sem := make(chan struct{}, 256)
	for i := range n {
		wg.Add(1)
		sem <- struct{}{}
		go func() {
			defer wg.Done()
			defer func() { <-sem }()
			if _, err := s.CreateConnection(context.Background(), sampleConn(fmt.Sprintf("tenants/t%06d/connections/erp", i)), tok); err != nil {
				b.Error(err)
			}
		}()
	}
	wg.Wait()
}

// BenchmarkDeleteWipe prices a delete, which compacts the file to wipe the
// erased bytes, against a token commit on the same file in the same run:
// compare the ns/op of delete with put-tokens. Every write waits while a
// delete compacts. Run with -benchtime=5x.
func BenchmarkDeleteWipe(b *testing.B) {
	const n = 100_000
	path := filepath.Join(b.TempDir(), "tokenbroker.db")
	keys := keyring(b, key(1))
	fill(b, path, keys, n)
	s, err := bolt.Open(path, bolt.Options{Keyring: keys})
	if err != nil {
		b.Fatal(err)
	}
	defer s.Close()
	ctx := context.Background()
	b.Run("put-tokens", func(b *testing.B) {
		for i := range b.N {
			if err := s.PutTokens(ctx, fmt.Sprintf("tenants/t%06d/connections/erp", i), sampleToken()); err != nil {
				b.Fatal(err)
			}
		}
	})
	next := 0 // b.N grows across runs: each deletes names not deleted yet
	b.Run("delete", func(b *testing.B) {
		for range b.N {
			if err := s.DeleteConnection(ctx, fmt.Sprintf("tenants/t%06d/connections/erp", next), 0); err != nil {
				b.Fatal(err)
			}
			next++
		}
	})
}
