package storetest

import (
	"bytes"
	"context"
	"fmt"
	"math/rand/v2"
	"os"
	"sync"
	"testing"

	"tokenbroker/storage"
	"tokenbroker/storage/bolt"
)

// Lifecycle is what the admin service needs of a store, beside the
// broker's methods.
type Lifecycle interface {
	Store
	Snapshot(ctx context.Context, header func(storage.SnapshotInfo) error, each func(storage.Record) error) error
	ResealBatch(ctx context.Context, after string, limit int) (string, storage.ResealStats, error)
	KeyUse(ctx context.Context) (storage.KeyUse, error)
}

// WriteBackup snapshots s into a backup file at path, as the backup
// command does, and returns how many connections it holds.
func WriteBackup(t testing.TB, s Lifecycle, path string) int64 {
	t.Helper()
	w, err := bolt.CreateBackup(path)
	if err != nil {
		t.Fatal(err)
	}
	var want int64
	err = s.Snapshot(context.Background(), func(info storage.SnapshotInfo) error {
		want = info.Count
		return w.SetMeta(info.Meta)
	}, w.Add)
	if err != nil {
		w.Abort()
		t.Fatal(err)
	}
	n, err := w.Finish()
	if err != nil || n != want {
		t.Fatalf("backup: %d of %d connections, %v", n, want, err)
	}
	if err := w.Publish(); err != nil {
		t.Fatal(err)
	}
	return n
}

// CheckNoPlaintext fails if the file at path holds a secret of the
// sample records in plain text.
func CheckNoPlaintext(t testing.TB, path string) {
	t.Helper()
	b, err := os.ReadFile(path)
	if err != nil {
		t.Fatal(err)
	}
	for _, s := range []string{Secret, Password, Refresh, Access, "rt-" + LoadName(0)} {
		if bytes.Contains(b, []byte(s)) {
			t.Errorf("%s holds %.8s... in plain text", path, s)
		}
	}
}

// CheckRestoredIntents checks that every chain CreateForLoad stored with
// tokens carries the restore intent at its own generation.
func CheckRestoredIntents(t testing.TB, s Store) {
	t.Helper()
	for i := range LoadAllCount {
		tok, err := s.GetTokens(context.Background(), LoadName(i))
		if err != nil {
			t.Fatal(err)
		}
		marked := tok.IntentGrant == storage.IntentRestored && tok.IntentGeneration == tok.Generation
		if WithTokens(i) != marked {
			t.Errorf("%s: intent %q at generation %d (of %d); with tokens: %v", LoadName(i), tok.IntentGrant, tok.IntentGeneration, tok.Generation, WithTokens(i))
		}
	}
}

// Reseal runs up to batches batches of a reseal pass (all of it when
// batches < 0) and says whether the pass is done.
func Reseal(t testing.TB, s Lifecycle, limit, batches int) (storage.ResealStats, bool) {
	t.Helper()
	var total storage.ResealStats
	after := ""
	for i := 0; batches < 0 || i < batches; i++ {
		next, st, err := s.ResealBatch(context.Background(), after, limit)
		if err != nil {
			t.Fatal(err)
		}
		total.Examined += st.Examined
		total.Resealed += st.Resealed
		if next == "" {
			return total, true
		}
		after = next
	}
	return total, false
}

// ResealUnderWrites runs a whole reseal pass while writers replace the
// tokens of random connections of CreateForLoad's, and checks that every
// connection ends with the last tokens written to it.
func ResealUnderWrites(t testing.TB, s Lifecycle, limit int) {
	t.Helper()
	var mu sync.Mutex
	last := map[string]string{}
	stop := make(chan struct{})
	var wg sync.WaitGroup
	for w := range 4 {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for j := 0; ; j++ {
				select {
				case <-stop:
					return
				default:
				}
				name := LoadName(rand.IntN(LoadAllCount))
				tok := SampleTokens()
				tok.RefreshToken = fmt.Sprintf("rt-%d-%d", w, j)
				mu.Lock() // one writer per name at a time, as the broker's turn
				if err := s.PutTokens(context.Background(), name, tok); err != nil {
					mu.Unlock()
					t.Error(err)
					return
				}
				last[name] = tok.RefreshToken
				mu.Unlock()
			}
		}()
	}
	Reseal(t, s, limit, -1)
	close(stop)
	wg.Wait()
	for name, rt := range last {
		tok, err := s.GetTokens(context.Background(), name)
		if err != nil || tok.RefreshToken != rt {
			t.Errorf("%s: refresh token %q after the reseal, want the last written %q (%v)", name, tok.RefreshToken, rt, err)
		}
	}
}
