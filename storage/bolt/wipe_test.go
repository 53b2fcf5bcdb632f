package bolt_test

import (
	"context"
	"os"
	"path/filepath"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"tokenbroker/storage"
)

// stallGuard bounds how long the operations that must not wait for an
// open snapshot may take in all: a failure guard, not a wait.
const stallGuard = 5 * time.Second

// TestDeleteDuringSnapshotDoesNotStall holds a snapshot open (as a backup
// stream does while it sends), deletes a connection, and reads and writes
// another: all of it answers while the snapshot is still open. Once the
// snapshot ends, the deleted connection's sealed bytes are gone from the
// file.
func TestDeleteDuringSnapshotDoesNotStall(t *testing.T) {
	path := filepath.Join(t.TempDir(), "db")
	ctx := context.Background()
	k := keyring(t, key(1))
	const kept = "tenants/b/connections/y"
	s := openStore(t, path, k)
	for _, n := range []string{victim, kept} {
		if _, err := s.CreateConnection(ctx, sampleConn(n), sampleToken()); err != nil {
			t.Fatal(err)
		}
	}
	s.Close()
	sealed := sealedValues(t, path, victim)
	s = openStore(t, path, k)

	entered, release := make(chan struct{}), make(chan struct{})
	var releaseOnce sync.Once
	unblock := func() { releaseOnce.Do(func() { close(release) }) }
	defer unblock()
	var seen []string
	snap := make(chan error, 1)
	go func() {
		snap <- s.Snapshot(ctx, func(storage.SnapshotInfo) error { return nil }, func(r storage.Record) error {
			seen = append(seen, r.Name)
			if len(seen) == 1 {
				close(entered)
				<-release
			}
			return nil
		})
	}()
	<-entered

	const rounds = 20
	var completed atomic.Int64
	ops := make(chan error, 1)
	go func() {
		if err := s.DeleteConnection(ctx, victim, 0); err != nil {
			ops <- err
			return
		}
		completed.Add(1)
		for range rounds {
			if _, err := s.GetConnection(ctx, kept); err != nil {
				ops <- err
				return
			}
			if err := s.PutTokens(ctx, kept, sampleToken()); err != nil {
				ops <- err
				return
			}
			if _, err := s.ListConnections(ctx, "tenants/", "", 10); err != nil {
				ops <- err
				return
			}
			completed.Add(3)
		}
		ops <- nil
	}()
	select {
	case err := <-ops:
		if err != nil {
			t.Fatalf("while a snapshot is open: %v", err)
		}
	case <-time.After(stallGuard):
		unblock()
		t.Fatalf("while a snapshot is open, %d of %d operations (a delete, then reads and writes) answered within %v", completed.Load(), 1+3*rounds, stallGuard)
	}
	if got := completed.Load(); got != 1+3*rounds {
		t.Fatalf("%d of %d operations completed", got, 1+3*rounds)
	}

	unblock()
	if err := <-snap; err != nil {
		t.Fatalf("snapshot: %v", err)
	}
	if len(seen) != 2 {
		t.Errorf("the snapshot saw %v; want both connections as they were when it began", seen)
	}
	// Read while the store holds the file: what is on disk once the
	// snapshot ended.
	raw, err := os.ReadFile(path)
	if err != nil {
		t.Fatal(err)
	}
	if containsAny(raw, sealed) {
		t.Error("the deleted connection's sealed bytes are still in the file after the snapshot ended")
	}
	if _, err := s.GetConnection(ctx, victim); err == nil {
		t.Error("the deleted connection is still readable")
	}
	if c, err := s.GetConnection(ctx, kept); err != nil || c.Name != kept {
		t.Fatalf("the live connection after the wipe: %v", err)
	}
	if err := s.Healthy(); err != nil {
		t.Errorf("health after the wipe: %v", err)
	}
}

// TestLongReadsDuringDeletes runs snapshots, key-use counts and reseal
// scans in loops while connections are deleted (each delete replacing the
// file): no read fails, and -race finds no race on the file handle.
func TestLongReadsDuringDeletes(t *testing.T) {
	s := openStore(t, filepath.Join(t.TempDir(), "db"), keyring(t, key(1)))
	ctx := context.Background()
	const n = 30
	for i := range n {
		if _, err := s.CreateConnection(ctx, sampleConn(name(i)), sampleToken()); err != nil {
			t.Fatal(err)
		}
	}
	readers := map[string]func() error{
		"snapshot": func() error {
			return s.Snapshot(ctx, func(storage.SnapshotInfo) error { return nil }, func(storage.Record) error { return nil })
		},
		"key use": func() error { _, err := s.KeyUse(ctx); return err },
		"reseal scan": func() error {
			_, _, err := s.ResealBatch(ctx, "", 5)
			return err
		},
	}
	stop := make(chan struct{})
	var started, wg sync.WaitGroup
	var mu sync.Mutex
	counts := map[string]int{}
	var failures []error
	for what, read := range readers {
		started.Add(1)
		wg.Add(1)
		go func() {
			defer wg.Done()
			for i := 0; ; i++ {
				err := read()
				mu.Lock()
				counts[what]++
				if err != nil {
					failures = append(failures, err)
				}
				mu.Unlock()
				if i == 0 {
					started.Done()
				}
				select {
				case <-stop:
					return
				default:
				}
			}
		}()
	}
	started.Wait()
	for i := range n - 5 {
		if err := s.DeleteConnection(ctx, name(i), 0); err != nil {
			t.Fatal(err)
		}
	}
	close(stop)
	wg.Wait()
	for _, err := range failures {
		t.Errorf("read during deletes: %v", err)
	}
	for what := range readers {
		if counts[what] < 2 {
			t.Errorf("%s ran %d times; want it to overlap the deletes", what, counts[what])
		}
	}
	list, err := s.ListConnections(ctx, "tenants/", "", 100)
	if err != nil || len(list) != 5 {
		t.Errorf("after %d deletes: %d connections, %v; want 5", n-5, len(list), err)
	}
}
