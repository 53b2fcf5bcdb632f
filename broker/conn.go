package broker

import (
	"context"
	"fmt"
	"sync"
	"sync/atomic"
	"time"

	"tokenbroker/storage"
)

// conn is one connection's live state. It owns every change to that state:
// callers orchestrate (talk upstream, write the store) and then call one of
// the transitions below, each named for what happened.
//
// Its token state has two parts that never mix: committed is the record as
// last made durable (or read from the store), and rt is what only this
// process knows (failures, backoff, DEGRADED, a commit still to retry).
// Runtime state is never written into a durable record: every record the
// broker writes is built from committed (see renew), so a restart cannot
// resurrect a DEGRADED that no longer holds.
type conn struct {
	name     string
	snap     atomic.Pointer[snapshot] // what the cached path reads; written only by publishLocked
	lastUsed atomic.Int64             // unix nanoseconds of the last token request
	watch    watchers                 // wakes WatchToken subscribers on each publish (watch.go)

	mu        sync.Mutex          // guards the fields below
	turn      chan struct{}       // capacity 1: held while talking to the token endpoint; made when first needed
	cfg       *storage.Connection // configuration with secrets
	committed *storage.Tokens     // token state as last made durable; never carries runtime state
	rt        runtimeState        // what only this process knows
	flight    *flight             // the shared refresh in progress, if any
	deleted   bool
	ev        connEvents // what the event feed last announced of it (events.go)
}

// runtimeState is a connection's state that lives in memory only.
type runtimeState struct {
	// pending is a token state whose commit failed (a rotated refresh token
	// only in memory, or a halt): it is retried before any upstream call,
	// and the old refresh token is never used again.
	pending *storage.Tokens
	// failures counts consecutive failed shared refreshes; backoffUntil is
	// the earliest next upstream call.
	failures     int
	backoffUntil time.Time
	// degraded is the reason code while the upstream or the store is
	// failing (DEGRADED); "" when not.
	degraded string
	// lastErr is the newest failure seen in this process.
	lastErr failureNote
	// recovering: an intent was found at start, left by a request whose
	// outcome is unknown (the broker stopped while it was at the upstream,
	// or it ended ambiguously); the refresh token may be spent (see
	// [conn.suspectLocked]). Attempts upstream certainly did not process
	// clear their intent, so a clean restart after them recovers nothing.
	recovering bool
	// rejected is an access token a caller reported answered 401, and
	// lastReject when such a report last started a refresh.
	rejected   string
	lastReject time.Time
	// setAside is a refresh token an ambiguous answer may have spent: it
	// is never presented again, and is revoked only once a new chain is
	// committed, since revoking it may end the session whose access token
	// is still served meanwhile.
	setAside string
}

// failureNote is one failure as status.last_error shows it.
type failureNote struct {
	code, message string
	at            time.Time
}

func newConn(cfg *storage.Connection, tok *storage.Tokens) *conn {
	return &conn{name: cfg.Name, cfg: cfg, committed: tok}
}

func newConnPublished(cfg *storage.Connection, tok *storage.Tokens) *conn {
	c := newConn(cfg, tok)
	c.publishLocked()
	return c
}

// publishLocked rebuilds the snapshot the cached path reads from the
// committed tokens and the runtime state. It is the one place a snapshot is
// published. c.mu must be held (or c not yet shared).
func (c *conn) publishLocked() {
	t := c.committed
	s := &snapshot{
		tok: Token{
			AccessToken: t.AccessToken,
			TokenType:   t.TokenType,
			ExpireTime:  t.AccessTokenExpireTime,
			InstanceURL: c.cfg.InstanceURL,
			Scopes:      t.Scopes,
		},
		state:      c.stateLocked(),
		rejected:   t.AccessToken != "" && c.rt.rejected == t.AccessToken,
		suspect:    c.suspectLocked(),
		defaultMin: defaultMinValid(c.lifetimeLocked()),
	}
	if len(s.tok.Scopes) == 0 {
		s.tok.Scopes = c.cfg.Scopes
	}
	c.snap.Store(s)
	c.watch.notify()
	c.announceLocked()
}

// newestLocked is the newest token state, durable or not: a pending one
// (a halt kept in memory when its commit failed counts) wins.
func (c *conn) newestLocked() *storage.Tokens {
	if c.rt.pending != nil {
		return c.rt.pending
	}
	return c.committed
}

// stateLocked derives the state: a halt from the newest record, else
// DEGRADED while failing, else ACTIVE.
func (c *conn) stateLocked() State {
	if st := State(c.newestLocked().State); st.halted() {
		return st
	}
	if c.rt.degraded != "" {
		return StateDegraded
	}
	return StateActive
}

// stateReasonLocked is the reason behind stateLocked.
func (c *conn) stateReasonLocked() string {
	t := c.newestLocked()
	switch {
	case State(t.State).halted():
		return t.StateReason
	case c.rt.degraded != "":
		return c.rt.degraded
	case c.rt.recovering:
		return ReasonCrashRecovery
	}
	return ""
}

// lastErrorLocked is the newest failure, durable (a halt, a revoked refresh
// token) or from this process.
func (c *conn) lastErrorLocked() failureNote {
	t := c.newestLocked()
	durable := failureNote{code: t.LastErrorCode, message: t.LastErrorMessage, at: t.LastErrorTime}
	if c.rt.lastErr.at.After(durable.at) {
		return c.rt.lastErr
	}
	return durable
}

// suspectLocked reports whether the held access token may be dead upstream:
// the broker stopped while a refresh was at the upstream, and an identity
// server that revokes access tokens on rotation may have revoked it. Such a
// token is not served; the recovery gets a new one first.
func (c *conn) suspectLocked() bool {
	return c.rt.recovering && c.committed.IntentGrant == grantRefresh
}

// haltedLocked reports whether the connection takes no upstream call until an
// operator updates it. c.mu must be held.
func (c *conn) haltedLocked() bool { return c.stateLocked().halted() }

// inBackoffLocked reports whether upstream calls must wait.
func (c *conn) inBackoffLocked(now time.Time) bool { return now.Before(c.rt.backoffUntil) }

// markDeletedLocked forgets the connection: nothing of it is served again.
func (c *conn) markDeletedLocked() {
	c.announceDeletedLocked()
	c.deleted = true
	c.cfg = &storage.Connection{Name: c.name}
	c.committed = &storage.Tokens{}
	c.rt = runtimeState{}
	c.publishLocked()
}

// committedLocked takes a token state that is now durable, without judging
// the upstream outcome (a dropped refresh token, a kept rotated one).
func (c *conn) committedLocked(next *storage.Tokens) {
	c.committed = next
	c.rt.pending = nil
	c.publishLocked()
}

// setAside keeps a refresh token an ambiguous answer may have spent, to
// revoke once a new chain is committed.
func (c *conn) setAside(spent string) {
	c.mu.Lock()
	defer c.mu.Unlock()
	c.rt.setAside = spent
}

// takeSetAside returns the refresh token set aside, if any, and forgets it:
// the caller revokes it.
func (c *conn) takeSetAside() string {
	c.mu.Lock()
	defer c.mu.Unlock()
	rt := c.rt.setAside
	c.rt.setAside = ""
	return rt
}

// intentLocked takes the durable intent record written before an upstream
// call. Nothing a caller sees changes.
func (c *conn) intentLocked(intent *storage.Tokens) { c.committed = intent }

// succeededLocked takes a token state that is durable after a successful
// upstream answer (or a retried commit of one): failures, backoff, DEGRADED
// and crash recovery end.
func (c *conn) succeededLocked(next *storage.Tokens) {
	c.committed = next
	c.rt.pending = nil
	c.rt.failures, c.rt.backoffUntil = 0, time.Time{}
	c.rt.degraded = ""
	c.rt.recovering = false
	c.publishLocked()
}

// attemptFailedLocked records one failed upstream attempt that the shared
// refresh will retry: DEGRADED shows at once, while a valid token is still
// served.
func (c *conn) attemptFailedLocked(code, msg string, now time.Time) {
	c.rt.lastErr = failureNote{code: code, message: msg, at: now}
	c.rt.degraded = code
	c.publishLocked()
}

// failedLocked records a failed shared refresh and starts a backoff of
// wait.
func (c *conn) failedLocked(code, msg string, wait time.Duration, now time.Time) {
	c.rt.failures++
	c.rt.backoffUntil = now.Add(wait)
	c.attemptFailedLocked(code, msg, now)
}

// pendingLocked keeps next in memory after its commit failed: it is
// retried before any upstream call, after a backoff.
func (c *conn) pendingLocked(next *storage.Tokens, msg string, wait time.Duration, now time.Time) {
	c.rt.pending = next
	c.failedLocked(ReasonStorageFailure, msg, wait, now)
}

// rejectedLocked records that a caller reported the held access token
// answered 401 by Acumatica: it is not served again.
func (c *conn) rejectedLocked() {
	c.rt.rejected = c.committed.AccessToken
	c.publishLocked()
}

// reportRefreshLocked records that a caller's report of a rejected token
// starts a refresh now: the cooldown against report storms counts from here.
func (c *conn) reportRefreshLocked(now time.Time) { c.rt.lastReject = now }

// takeNewerLocked takes a token state committed elsewhere (another replica,
// an update) if it is newer: a later generation, or the same one halted.
// It reports whether it did.
func (c *conn) takeNewerLocked(t *storage.Tokens) bool {
	cur := c.committed
	newer := t.Generation > cur.Generation ||
		(t.Generation == cur.Generation && State(t.State).halted() && !State(cur.State).halted())
	if !newer || c.deleted {
		return false
	}
	c.succeededLocked(t)
	return true
}

// takeNewer is takeNewerLocked with c.mu taken.
func (c *conn) takeNewer(t *storage.Tokens) bool {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.takeNewerLocked(t)
}

// configLocked takes a newer configuration.
func (c *conn) configLocked(cfg *storage.Connection) {
	prev := c.cfg.Revision
	c.cfg = cfg
	c.announceUpdatedLocked(prev)
	c.publishLocked()
}

// failureCount is the number of consecutive failed shared refreshes.
func (c *conn) failureCount() int {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.rt.failures
}

// touchEvery is the resolution of lastUsed: fine enough for maintenance to
// see use of a token that lives a second, coarse enough that many callers
// do not fight over the cache line (at most ten writes a second).
const touchEvery = 100 * time.Millisecond

// touch records use, writing only when the stored value is older than
// touchEvery.
func (c *conn) touch(now time.Time) {
	n := now.UnixNano()
	if old := c.lastUsed.Load(); n-old > int64(touchEvery) {
		c.lastUsed.Store(n)
	}
}

// turnChan returns c's turn, making it on first use: most connections loaded
// at start do not talk to the token endpoint for a while.
func (c *conn) turnChan() chan struct{} {
	c.mu.Lock()
	defer c.mu.Unlock()
	if c.turn == nil {
		c.turn = make(chan struct{}, 1)
	}
	return c.turn
}

// admit makes a connection read from the store live and keeps it, unless
// it is already live (Load and a caller's loadOne can both read it; the
// first to store wins, and only it reports a token request left in flight)
// or was deleted meanwhile. It returns the live connection, nil when
// deleted.
func (b *Broker) admit(cfg *storage.Connection, tok *storage.Tokens) *conn {
	if _, dead := b.tombs.Load(cfg.Name); dead {
		return nil
	}
	if tok.State == string(StateDegraded) {
		// Files written before DEGRADED became runtime-only may hold it.
		tok = tok.Clone()
		tok.State, tok.StateReason = "", ""
	}
	c := newConn(cfg, tok)
	c.rt.recovering = tok.IntentGrant != ""
	c.publishLocked()
	b.events.admitted(c, false)
	if v, existed := b.conns.LoadOrStore(cfg.Name, c); existed {
		return v.(*conn)
	}
	// A delete may have landed between the check and the store.
	if _, dead := b.tombs.Load(cfg.Name); dead {
		b.conns.CompareAndDelete(cfg.Name, c)
		return nil
	}
	if c.rt.recovering {
		b.log.Warn("token request was in flight at last stop; refresh token may be spent",
			"connection", cfg.Name, "grant", tok.IntentGrant, "generation", tok.IntentGeneration)
	}
	return c
}

// loadOne reads one connection from the store while [Broker.Load] runs.
func (b *Broker) loadOne(ctx context.Context, name string) *conn {
	if _, dead := b.tombs.Load(name); dead {
		return nil
	}
	cfg, err := b.store.GetConnection(ctx, name)
	if err != nil {
		return nil
	}
	tok, err := b.store.GetTokens(ctx, name)
	if err != nil {
		return nil
	}
	return b.admit(cfg, tok)
}

// viewLocked builds the read view of c from its configuration, committed
// tokens and runtime state, secrets cleared.
func (b *Broker) viewLocked(c *conn) *View {
	cfg := c.cfg.Clone()
	t := c.committed
	v := &View{
		Conn:            cfg,
		ClientSecretSet: cfg.ClientSecret != "",
		PasswordSet:     cfg.Password != "",
		State:           c.stateLocked(),
		ETag:            etag(cfg),
	}
	cfg.ClientSecret, cfg.Password = "", ""
	st := &v.Status
	last := c.lastErrorLocked()
	st.LastErrorCode, st.LastErrorMessage, st.LastErrorTime = last.code, last.message, last.at
	st.LastRefreshTime = t.IssueTime
	st.AccessTokenExpireTime = t.AccessTokenExpireTime
	st.HasRefreshToken = t.RefreshToken != ""
	st.ChainStartTime = t.ChainStartTime
	st.StateReason = c.stateReasonLocked()
	if st.HasRefreshToken && !t.RefreshTokenUseTime.IsZero() {
		idle := t.RefreshTokenUseTime.Add(b.sliding(cfg))
		if cfg.AbsoluteLifetime > 0 && !t.ChainStartTime.IsZero() {
			idle = minTime(idle, t.ChainStartTime.Add(cfg.AbsoluteLifetime))
		}
		st.RefreshTokenIdleExpireTime = idle
	}
	st.Warnings = b.warningsLocked(c, cfg)
	return v
}

// warningsLocked lists what an operator should act on.
func (b *Broker) warningsLocked(c *conn, cfg *storage.Connection) []string {
	var w []string
	if exp := cfg.ClientSecretExpireTime; !exp.IsZero() {
		switch left := exp.Sub(b.now()); {
		case left <= 0:
			w = append(w, "client secret expired on "+exp.UTC().Format(time.DateOnly)+": add a new shared secret in the Connected Application and update client_secret")
		case left <= 30*24*time.Hour:
			w = append(w, fmt.Sprintf("client secret expires on %s (in %d days): add a new shared secret and update client_secret", exp.UTC().Format(time.DateOnly), int(left.Hours()/24)))
		}
	}
	if c.rt.recovering {
		w = append(w, "a token request was in flight when the broker last stopped; the refresh token may have been spent and is being checked")
	}
	if c.rt.pending != nil {
		w = append(w, "a rotated refresh token is held in memory only: the durable store is failing; commit is being retried")
	}
	return append(w, b.eventWarningsLocked(c)...)
}

// viewOf is viewLocked with c.mu taken.
func (b *Broker) viewOf(c *conn) *View {
	c.mu.Lock()
	defer c.mu.Unlock()
	return b.viewLocked(c)
}

func minTime(a, b time.Time) time.Time {
	if a.Before(b) {
		return a
	}
	return b
}
