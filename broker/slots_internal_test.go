package broker

import (
	"context"
	"errors"
	"testing"
)

func TestSlotsGiveBackEverythingTheyTake(t *testing.T) {
	s := newSlots(2, 1)
	const a, b = "https://a.example.com/Site1", "https://a.example.com/Site2" // one server
	relA, err := s.acquire(context.Background(), a)
	if err != nil {
		t.Fatal(err)
	}
	// The host's one slot is taken: a second call to the same server waits
	// until its context ends, and holds nothing afterwards.
	ctx, cancel := context.WithCancel(context.Background())
	cancel()
	if _, err := s.acquire(ctx, b); !errors.Is(err, context.Canceled) {
		t.Fatalf("second call to a busy host: err = %v, want context.Canceled", err)
	}
	// Another host gets the second global slot; then the global cap is full,
	// and a third host's call gives its host slot back when it stops waiting.
	relC, err := s.acquire(context.Background(), "https://c.example.com")
	if err != nil {
		t.Fatal(err)
	}
	if _, err := s.acquire(ctx, "https://d.example.com"); !errors.Is(err, context.Canceled) {
		t.Fatalf("call beyond the global cap: err = %v, want context.Canceled", err)
	}
	if n := s.busyHosts(); n != 2 {
		t.Errorf("hosts tracked = %d, want the 2 with calls in flight", n)
	}
	if len(s.global) != 2 {
		t.Errorf("global slots held = %d, want 2", len(s.global))
	}
	relA()
	relC()
	if n := s.busyHosts(); n != 0 || len(s.global) != 0 {
		t.Errorf("after release: %d hosts tracked, %d global slots held; want none", n, len(s.global))
	}
	// Everything is free again: the cancelled waits left nothing behind.
	rel, err := s.acquire(context.Background(), "https://d.example.com")
	if err != nil {
		t.Fatal(err)
	}
	rel()
}
