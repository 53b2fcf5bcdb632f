// Package testkit holds the small helpers the module's tests share: a
// settable clock, a buffer safe for concurrent writers, a file's hash, and
// a wait for a condition another goroutine makes true.
//
// It is for tests only: production code must never import it.
package testkit

import (
	"bytes"
	"crypto/sha256"
	"os"
	"sync"
	"testing"
	"time"
)

// Clock is a settable clock, safe for concurrent use. Pass its Now where a
// component takes `Now func() time.Time`.
type Clock struct {
	mu sync.Mutex // guards t
	t  time.Time
}

// Epoch is where a [NewClock] starts: a fixed, ordinary Tuesday morning.
var Epoch = time.Date(2026, 11, 24, 9, 0, 0, 0, time.UTC)

// NewClock returns a clock at [Epoch].
func NewClock() *Clock { return &Clock{t: Epoch} }

// Now returns the clock's time.
func (c *Clock) Now() time.Time {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.t
}

// Advance moves the clock forward by d.
func (c *Clock) Advance(d time.Duration) {
	c.mu.Lock()
	defer c.mu.Unlock()
	c.t = c.t.Add(d)
}

// LockedBuffer is a bytes.Buffer that many goroutines may write (a logger,
// a child process's output) while a test reads it.
type LockedBuffer struct {
	mu sync.Mutex // guards b
	b  bytes.Buffer
}

// Write appends p.
func (l *LockedBuffer) Write(p []byte) (int, error) {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.b.Write(p)
}

// String returns everything written so far.
func (l *LockedBuffer) String() string {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.b.String()
}

// FileSum returns the SHA-256 of the file at path, failing t if it cannot
// be read.
func FileSum(t testing.TB, path string) [32]byte {
	t.Helper()
	b, err := os.ReadFile(path)
	if err != nil {
		t.Fatal(err)
	}
	return sha256.Sum256(b)
}

// Eventually waits up to 10 s for cond, which another goroutine or process
// makes true, polling every 5 ms; it fails t naming what it waited for.
// Use it for effects that arrive asynchronously (a watch, a log line),
// never to let things "settle" before counting.
func Eventually(t testing.TB, what string, cond func() bool) {
	t.Helper()
	deadline := time.Now().Add(10 * time.Second)
	for !cond() {
		if time.Now().After(deadline) {
			t.Fatalf("timed out waiting for %s", what)
		}
		time.Sleep(5 * time.Millisecond)
	}
}
