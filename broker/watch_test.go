package broker_test

import (
	"context"
	"errors"
	"sync/atomic"
	"testing"
	"time"

	"tokenbroker/broker"
	"tokenbroker/broker/acumaticatest"
)

// next runs w.Next in the background, so a test can act and then collect.
func next(w *broker.Watch) <-chan result {
	out := make(chan result, 1)
	go func() {
		ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
		defer cancel()
		tok, err := w.Next(ctx)
		out <- result{tok, err}
	}()
	return out
}

type result struct {
	tok broker.Token
	err error
}

func watch(t *testing.T, e *env) (*broker.Watch, broker.Token) {
	t.Helper()
	w, err := e.b.WatchToken(connName, time.Minute)
	if err != nil {
		t.Fatal(err)
	}
	first := <-next(w)
	if first.err != nil {
		t.Fatalf("first Next: %v", first.err)
	}
	return w, first.tok
}

func TestWatchTokenSendsTheTokenARejectedReportRotatesOnceCommitted(t *testing.T) {
	e := newEnv(t)
	e.create()
	w, first := watch(t, e)
	if first.AccessToken == "" || !e.idp.AccessTokenValid(first.AccessToken) {
		t.Fatalf("first token %q is not one the stand-in issued and holds valid", first.AccessToken[:min(8, len(first.AccessToken))])
	}
	pending := next(w)
	select {
	case r := <-pending:
		t.Fatalf("Next returned before any rotation: %v", r.err)
	case <-time.After(50 * time.Millisecond): // a negative check: nothing rotated, so nothing may arrive
	}
	// Another caller reports the token rejected: the rotation it causes
	// reaches the watch.
	rotated, err := e.b.GetAccessToken(context.Background(), connName, time.Minute, first.AccessToken)
	if err != nil {
		t.Fatal(err)
	}
	r := <-pending
	if r.err != nil {
		t.Fatal(r.err)
	}
	if r.tok.AccessToken != rotated.AccessToken || r.tok.AccessToken == first.AccessToken {
		t.Fatal("the watch did not deliver the token the rejected report brought")
	}
	if st := e.stored(); st.AccessToken != r.tok.AccessToken || st.RefreshToken == "" {
		t.Fatal("the watch delivered a token whose refresh token is not committed")
	}
}

func TestWatchTokenEndsWhenTheConnectionIsDeleted(t *testing.T) {
	e := newEnv(t)
	v := e.create()
	w, _ := watch(t, e)
	pending := next(w)
	if err := e.b.DeleteConnection(context.Background(), connName, v.ETag); err != nil {
		t.Fatal(err)
	}
	r := <-pending
	var be *broker.Error
	if !errors.Is(r.err, broker.ErrNotFound) || !errors.As(r.err, &be) || be.Name != connName {
		t.Fatalf("Next after delete: %v, want ErrNotFound naming %s", r.err, connName)
	}
	if _, err := e.b.WatchToken(connName, time.Minute); !errors.Is(err, broker.ErrNotFound) {
		t.Fatalf("WatchToken of a deleted connection: %v, want ErrNotFound", err)
	}
}

func TestWatchTokenEndsWhenTheConnectionNeedsReauth(t *testing.T) {
	e := newEnv(t)
	e.create()
	w, first := watch(t, e)
	pending := next(w)
	e.idp.AddUser(username, "changed-by-someone") // ends sessions, revokes refresh tokens
	e.clock.Advance(2 * time.Hour)
	if _, err := e.b.GetAccessToken(context.Background(), connName, time.Minute, first.AccessToken); !errors.Is(err, broker.ErrCredentialsRejected) {
		t.Fatalf("GetAccessToken: %v, want ErrCredentialsRejected", err)
	}
	r := <-pending
	var be *broker.Error
	if !errors.Is(r.err, broker.ErrCredentialsRejected) || !errors.As(r.err, &be) || be.Reason != broker.ReasonCredentialsRejected {
		t.Fatalf("Next after the halt: %v, want ErrCredentialsRejected (CREDENTIALS_REJECTED)", r.err)
	}
}

func TestWatchTokenAsksForANewTokenWhenTheLastOneRunsShort(t *testing.T) {
	e := newEnv(t, func(o *acumaticatest.Options, _ *broker.Options) { o.AccessTokenLifetime = time.Hour })
	e.create()
	w, first := watch(t, e)
	// No maintenance loop runs (TickInterval -1): only the watch can
	// notice that its token no longer has a minute left.
	e.clock.Advance(time.Hour - 30*time.Second)
	before := e.idp.Counts().RefreshGrants
	r := <-next(w)
	if r.err != nil {
		t.Fatal(r.err)
	}
	if r.tok.AccessToken == first.AccessToken || r.tok.ExpireTime.Sub(e.clock.Now()) < time.Minute {
		t.Fatal("Next did not bring a token valid for min_valid_for")
	}
	if got := e.idp.Counts().RefreshGrants - before; got != 1 {
		t.Fatalf("refresh grants = %d, want 1", got)
	}
}

func TestWatchTokenSkipsToTheNewestForASlowReader(t *testing.T) {
	e := newEnv(t)
	e.create()
	w, first := watch(t, e)
	// Three rotations while the reader is away: it gets the last, once.
	last := first
	for range 3 {
		tok, err := e.b.GetAccessToken(context.Background(), connName, time.Minute, last.AccessToken)
		if err != nil {
			t.Fatal(err)
		}
		last = tok
		e.clock.Advance(10 * time.Second) // past the reject cooldown
	}
	r := <-next(w)
	if r.err != nil || r.tok.AccessToken != last.AccessToken {
		t.Fatalf("slow reader got an older token (err %v)", r.err)
	}
}

func TestWatchTokenOnTwoReplicasDeliversTheSameRotation(t *testing.T) {
	p := twoReplicas(t, acumaticatest.Options{})
	p.createSeenByB(t)
	a, b := p.a, p.b
	var pending []<-chan result
	var first string
	for _, r := range []*broker.Broker{a, b} {
		w, err := r.WatchToken(connName, time.Minute)
		if err != nil {
			t.Fatal(err)
		}
		got := <-next(w)
		if got.err != nil {
			t.Fatal(got.err)
		}
		first = got.tok.AccessToken
		pending = append(pending, next(w))
	}
	// A caller of replica a reports the token: b learns of the rotation
	// only through etcd.
	rotated, err := a.GetAccessToken(context.Background(), connName, time.Minute, first)
	if err != nil {
		t.Fatal(err)
	}
	for i, p := range pending {
		r := <-p
		if r.err != nil {
			t.Fatalf("replica %d: %v", i, r.err)
		}
		if r.tok.AccessToken != rotated.AccessToken {
			t.Fatalf("replica %d pushed a different token than the rotation committed", i)
		}
	}
}

func TestWatchTokenAloneKeepsTheConnectionInUse(t *testing.T) {
	// The broker's clock moves on by a microsecond at each reading, as real
	// time does: a token is taken by a watch after it was issued.
	e := newEnv(t, func(_ *acumaticatest.Options, o *broker.Options) {
		inner := o.Now
		var ticks atomic.Int64
		o.Now = func() time.Time { return inner().Add(time.Duration(ticks.Add(1)) * time.Microsecond) }
	})
	e.create()
	w, last := watch(t, e)
	before := e.idp.Counts().RefreshGrants
	for i := range 2 {
		// Past 75% of the token's life, with no caller but the watch: the
		// maintenance pass renews it, and the watch brings the new token.
		e.clock.Advance(50 * time.Minute)
		pending := next(w)
		e.b.Maintain()
		r := <-pending
		if r.err != nil {
			t.Fatal(r.err)
		}
		if r.tok.AccessToken == last.AccessToken {
			t.Fatalf("rotation %d: the watch returned the old token", i+1)
		}
		last = r.tok
		e.b.Settle() // the refresh has published; let its flight end before the next pass
	}
	if got := e.idp.Counts().RefreshGrants - before; got != 2 {
		t.Fatalf("refresh grants = %d, want 2 (proactive, for a watched connection)", got)
	}
}
