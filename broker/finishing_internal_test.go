package broker

import (
	"context"
	"io"
	"log/slog"
	"runtime"
	"testing"
	"time"

	"tokenbroker/broker/acumaticatest"
	"tokenbroker/storage"
)

// TestReportOfATokenFromAFinishingRefreshRefreshesAgain: a shared refresh
// has committed a new token but not yet ended when a caller reports that
// very token rejected. The caller must not settle for the ending refresh,
// which brings nothing newer, but get a token from a refresh of its own.
// (Seen once in the kill -9 suite as "no valid token could be obtained".)
func TestReportOfATokenFromAFinishingRefreshRefreshesAgain(t *testing.T) {
	idp := acumaticatest.New(acumaticatest.Options{RevokeAccessOnRefresh: true})
	idp.AddClient("88358B02-A48D-A50E-F710-39C1636C30F6@T", "secret")
	idp.AddUser("u", "pw")
	hs := idp.Start()
	defer hs.Close()
	st := openStore(t)
	b, err := New(Options{Store: st, TickInterval: -1, AllowInsecureUpstream: true, Logger: slog.New(slog.NewTextHandler(io.Discard, nil))})
	if err != nil {
		t.Fatal(err)
	}
	defer b.Close()
	const name = "tenants/t/connections/erp"
	ctx := context.Background()
	if _, err := b.CreateConnection(ctx, &storage.Connection{Name: name, InstanceURL: hs.URL,
		ClientID: "88358B02-A48D-A50E-F710-39C1636C30F6@T", ClientSecret: "secret", Username: "u", Password: "pw"}, false); err != nil {
		t.Fatal(err)
	}
	issued, err := b.GetAccessToken(ctx, name, time.Minute, "")
	if err != nil {
		t.Fatal(err)
	}
	v, _ := b.conns.Load(name)
	c := v.(*conn)
	// A refresh that started at the generation before and committed the
	// token just served: the state a flight is in between its commit and
	// its end.
	c.mu.Lock()
	f := &flight{done: make(chan struct{}), why: triggerRejected, gen: c.committed.Generation - 1}
	c.flight = f
	c.mu.Unlock()

	type answer struct {
		tok Token
		err error
	}
	got := make(chan answer, 1)
	go func() {
		tok, err := b.GetAccessToken(ctx, name, time.Minute, issued.AccessToken)
		got <- answer{tok, err}
	}()
	// The reporter marks the token rejected and picks its flight under one
	// hold of c.mu: once the mark shows, taking c.mu means it has picked.
	deadline := time.Now().Add(10 * time.Second)
	for !c.snap.Load().rejected {
		if time.Now().After(deadline) {
			t.Fatal("the report never reached the connection")
		}
		runtime.Gosched()
	}
	c.mu.Lock()
	c.flight = nil
	c.mu.Unlock()
	close(f.done)

	a := <-got
	if a.err != nil {
		t.Fatalf("the report of the finishing refresh's token failed: %v", a.err)
	}
	if a.tok.AccessToken == issued.AccessToken || !idp.AccessTokenValid(a.tok.AccessToken) {
		t.Fatal("the reporter was answered with the rejected token or a dead one")
	}
	if n := idp.Counts().RefreshGrants; n != 1 {
		t.Errorf("refresh grants = %d, want 1: the reporter's own", n)
	}
}
