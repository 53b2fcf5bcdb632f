package broker

import (
	"context"
	"sync/atomic"
	"time"
)

// watchers wakes the goroutines waiting for a connection's next snapshot.
// A waiter takes the current channel before it reads the snapshot; the
// next publish closes that channel. Closing never blocks, however many wait
// and however slowly they read, and a waiter that wakes reads the newest
// snapshot: a slow reader skips tokens, it never queues them.
type watchers struct {
	ch      atomic.Pointer[chan struct{}] // nil until someone waits
	touched atomic.Pointer[snapshot]      // the snapshot a watch last marked the connection in use for
}

// notify wakes every waiter. It is called by the one place a connection's
// snapshot is replaced (conn.publishLocked), after the new snapshot is
// stored.
func (w *watchers) notify() {
	if p := w.ch.Swap(nil); p != nil {
		close(*p)
	}
}

// changed returns a channel closed by the next notify.
func (w *watchers) changed() <-chan struct{} {
	for {
		if p := w.ch.Load(); p != nil {
			return *p
		}
		ch := make(chan struct{})
		if w.ch.CompareAndSwap(nil, &ch) {
			return ch
		}
	}
}

// Watch follows one connection's tokens; see [Broker.WatchToken]. A Watch
// is used by one goroutine.
type Watch struct {
	b        *Broker
	c        *conn
	minValid time.Duration
	last     string      // the access token Next returned last; "" before the first
	timer    *time.Timer // reused by wait: thousands of watches wait at once
}

// WatchToken subscribes to the tokens of a connection: [Watch.Next] returns
// the current token, then each newer one once it is committed (a snapshot
// is published only after its refresh token is durable). It fails with
// ErrNotFound for an unknown connection. minValid means what it means to
// [Broker.GetAccessToken], [MinValidDefault] included. A Watch holds
// nothing that needs releasing: dropping it ends the subscription.
func (b *Broker) WatchToken(name string, minValid time.Duration) (*Watch, error) {
	c, err := b.lookup(name)
	if err != nil {
		return nil, err
	}
	return &Watch{b: b, c: c, minValid: minValid}, nil
}

// Next returns the first token valid for at least minValid (refreshing if
// none is held, as GetAccessToken does), and on later calls waits for a
// token newer than the one it returned last. While waiting it keeps the
// connection in use, so the broker refreshes it ahead of expiry, and when
// the token it returned comes within minValid of expiry without a newer one
// it asks for one itself. Tokens published while the caller was busy are
// skipped: Next returns the newest.
//
// Next fails with the connection's error when it is deleted (ErrNotFound) or
// halts (ErrCredentialsRejected, ErrRefreshTokenMissing), with the refresh's
// error when a needed token cannot be had, with ErrClosed when the broker
// closes, and with ctx's error.
func (w *Watch) Next(ctx context.Context) (Token, error) {
	if w.last == "" {
		return w.take(w.b.GetAccessToken(ctx, w.c.name, w.minValid, ""))
	}
	for {
		changed := w.c.watch.changed()
		s := w.c.snap.Load()
		if err := w.ended(s); err != nil {
			return Token{}, err
		}
		now := w.b.now()
		if s.tok.AccessToken != w.last && s.usable(now, w.minValid) {
			return w.take(s.tok, nil)
		}
		// Nothing newer yet. The token last returned must be replaced when
		// it comes within minValid of expiry, whether or not the broker's
		// proactive refresh has run by then.
		due := s.tok.ExpireTime.Sub(now) - s.need(w.minValid)
		if s.tok.AccessToken != w.last || due <= 0 {
			tok, err := w.b.GetAccessToken(ctx, w.c.name, w.minValid, "")
			if err != nil || tok.AccessToken != w.last {
				return w.take(tok, err)
			}
			due = time.Second // the clock disagrees with the token: look again shortly
		}
		if err := w.wait(ctx, changed, due); err != nil {
			return Token{}, err
		}
	}
}

// take records tok as returned and the connection as in use: the broker's
// proactive refresh renews only tokens asked for since they were issued, and
// a token taken from a published snapshot was issued before now. Many
// watches wake together on one rotation: the first to take a snapshot's
// token writes the time, the others see it done.
func (w *Watch) take(tok Token, err error) (Token, error) {
	if err != nil {
		return Token{}, err
	}
	w.last = tok.AccessToken
	c := w.c
	if s := c.snap.Load(); c.watch.touched.Load() != s {
		c.watch.touched.Store(s)
		c.lastUsed.Store(w.b.now().UnixNano())
	}
	return tok, nil
}

// ended returns the error that ends the watch: the connection was deleted
// or halted. Both publish a snapshot with no usable token or a halted
// state, so the common snapshot (a token, ACTIVE) is judged without a lock.
func (w *Watch) ended(s *snapshot) error {
	if s.tok.AccessToken != "" && !s.state.halted() {
		return nil
	}
	c := w.c
	c.mu.Lock()
	defer c.mu.Unlock()
	if c.deleted {
		return notFound(c.name)
	}
	if st := c.stateLocked(); st.halted() {
		return haltedError(c.name, st, c.stateReasonLocked())
	}
	return nil
}

// wait returns when the snapshot changes, after d, or with an error when ctx
// ends or the broker closes.
func (w *Watch) wait(ctx context.Context, changed <-chan struct{}, d time.Duration) error {
	if w.timer == nil {
		w.timer = time.NewTimer(d)
	} else {
		w.timer.Reset(d) // since Go 1.23 no stale tick survives a Stop or Reset
	}
	defer w.timer.Stop()
	select {
	case <-changed:
		return nil
	case <-w.timer.C:
		return nil
	case <-ctx.Done():
		return ctx.Err()
	case <-w.b.stop:
		return ErrClosed
	}
}
