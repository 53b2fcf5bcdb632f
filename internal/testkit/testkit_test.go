package testkit_test

import (
	"os"
	"path/filepath"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"tokenbroker/internal/testkit"
)

func TestClockMovesOnlyWhenAdvanced(t *testing.T) {
	c := testkit.NewClock()
	if got := c.Now(); !got.Equal(testkit.Epoch) {
		t.Fatalf("Now = %v, want %v", got, testkit.Epoch)
	}
	c.Advance(90 * time.Second)
	if got, want := c.Now(), testkit.Epoch.Add(90*time.Second); !got.Equal(want) {
		t.Errorf("Now = %v, want %v", got, want)
	}
}

func TestLockedBufferKeepsEveryConcurrentWrite(t *testing.T) {
	var b testkit.LockedBuffer
	var wg sync.WaitGroup
	for range 50 {
		wg.Go(func() { b.Write([]byte("x")) })
	}
	wg.Wait()
	if got := len(b.String()); got != 50 {
		t.Errorf("len = %d, want 50", got)
	}
}

func TestFileSumChangesWithContent(t *testing.T) {
	p := filepath.Join(t.TempDir(), "f")
	os.WriteFile(p, []byte("a"), 0o600)
	a := testkit.FileSum(t, p)
	os.WriteFile(p, []byte("b"), 0o600)
	if testkit.FileSum(t, p) == a {
		t.Error("sum unchanged after the content changed")
	}
}

func TestEventuallyWaitsForAnotherGoroutine(t *testing.T) {
	var done atomic.Bool
	go func() {
		time.Sleep(20 * time.Millisecond)
		done.Store(true)
	}()
	testkit.Eventually(t, "the flag", done.Load)
	if !done.Load() {
		t.Error("returned before the condition held")
	}
}
