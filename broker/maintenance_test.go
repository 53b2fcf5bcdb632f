package broker_test

import (
	"context"
	"testing"
	"time"

	"tokenbroker/broker"
	"tokenbroker/broker/acumaticatest"
)

// Tests of what maintenance renews and when: proactive refresh, keep-alive,
// chain renewal, retried commits and crash recovery.

func TestProactiveRefreshOfTokensInUse(t *testing.T) {
	e := newEnv(t)
	e.create()
	first := e.mustToken()
	e.clock.Advance(40 * time.Minute)
	e.mustToken() // in use
	e.b.Maintain()
	e.settle() // waits for the shared refresh
	if c := e.idp.Counts(); c.RefreshGrants != 0 {
		t.Fatalf("refreshed at 40 of 60 minutes: %+v", c)
	}
	e.mustToken()
	e.clock.Advance(6 * time.Minute) // 46 min: past 75%
	e.b.Maintain()
	e.settle()
	if c := e.idp.Counts(); c.RefreshGrants != 1 {
		t.Fatalf("refresh grants = %d at 46 of 60 minutes, want 1", c.RefreshGrants)
	}
	tok := e.mustToken()
	if tok.AccessToken == first.AccessToken || tok.ExpireTime.Sub(e.clock.Now()) < 59*time.Minute {
		t.Error("caller did not get the proactively refreshed token")
	}
}

func TestIdleConnectionKeepAlive(t *testing.T) {
	e := newEnv(t)
	e.create()
	e.clock.Advance(6 * 24 * time.Hour)
	e.b.Maintain()
	e.settle()
	if c := e.idp.Counts(); c.RefreshGrants != 0 {
		t.Fatalf("idle refresh after 6 days: %+v", c)
	}
	e.clock.Advance(25 * time.Hour) // 7 days + 1 h since last use
	e.b.Maintain()
	e.settle()
	if c := e.idp.Counts(); c.RefreshGrants != 1 || c.InvalidGrant != 0 {
		t.Fatalf("counts = %+v, want one successful keep-alive refresh", c)
	}
	// Another 14 days idle would kill an unused token; kept alive, it lives.
	e.clock.Advance(8 * 24 * time.Hour)
	e.b.Maintain()
	e.settle()
	e.clock.Advance(8 * 24 * time.Hour)
	e.mustToken()
	if c := e.idp.Counts(); c.PasswordGrants != 1 || c.InvalidGrant != 0 {
		t.Errorf("counts = %+v, want no password grant after 23 idle days", c)
	}
}

func TestAbsoluteLifetimeRenewsChainAtQuietMoment(t *testing.T) {
	e := newEnv(t, func(o *acumaticatest.Options, _ *broker.Options) { o.AbsoluteLifetime = 30 * 24 * time.Hour })
	c := e.conn()
	c.AbsoluteLifetime = 30 * 24 * time.Hour
	if _, err := e.b.CreateConnection(context.Background(), c, false); err != nil {
		t.Fatal(err)
	}
	for range 3 { // weekly keep-alive refreshes while idle
		e.clock.Advance(7*24*time.Hour + time.Hour)
		e.b.Maintain()
		e.settle()
	}
	if got := e.idp.Counts(); got.PasswordGrants != 1 || got.RefreshGrants != 3 {
		t.Fatalf("counts = %+v, want 3 keep-alive refreshes and no password grant", got)
	}
	e.clock.Advance(7 * 24 * time.Hour) // day 28+: inside the last 5 days before the deadline, idle
	e.b.Maintain()
	e.settle()
	got := e.idp.Counts()
	if got.PasswordGrants != 2 || got.Revocations != 1 || got.OpenSessions != 1 {
		t.Fatalf("counts = %+v, want the chain renewed with one password grant and the old chain revoked", got)
	}
	e.clock.Advance(5 * 24 * time.Hour) // past the old chain's absolute deadline
	e.mustToken()
	if got := e.idp.Counts(); got.InvalidGrant != 0 {
		t.Errorf("invalid grants = %d, want 0 (%+v)", got.InvalidGrant, got)
	}
}

func TestStoreFailureOnCommitKeepsServingAndRetries(t *testing.T) {
	e := newEnv(t)
	e.create()
	old := e.mustToken()
	e.clock.Advance(50 * time.Minute)
	// Intent write succeeds, the commit of the rotated token fails.
	e.fs.mu.Lock()
	e.fs.failPuts = 0
	e.fs.mu.Unlock()
	failAfterIntent := &onceAfter{}
	e.fs.Store = failAfterIntent.wrap(e.store)
	tok, err := e.token(15 * time.Minute)
	if err != nil {
		t.Fatalf("err = %v, want the old still-valid token", err)
	}
	if tok.AccessToken != old.AccessToken {
		t.Error("new access token handed out before its refresh token was committed")
	}
	v := e.view()
	if v.State != broker.StateDegraded || v.Status.LastErrorCode != broker.ReasonStorageFailure {
		t.Errorf("state %s code %s, want DEGRADED STORAGE_FAILURE", v.State, v.Status.LastErrorCode)
	}
	// Disk is back: maintenance retries the commit without an upstream call.
	failAfterIntent.heal()
	e.clock.Advance(time.Second)
	e.b.Maintain()
	e.settle()
	c := e.idp.Counts()
	if c.RefreshGrants != 1 {
		t.Errorf("refresh grants = %d, want 1 (the commit retry must not call upstream)", c.RefreshGrants)
	}
	st := e.stored()
	if st.Generation != 2 || !e.idp.AccessTokenValid(st.AccessToken) {
		t.Errorf("stored gen %d, live %v", st.Generation, e.idp.AccessTokenValid(st.AccessToken))
	}
	e.clock.Advance(2 * time.Hour)
	e.mustToken()
	if c := e.idp.Counts(); c.InvalidGrant != 0 || c.PasswordGrants != 1 {
		t.Errorf("counts = %+v: the rotated refresh token was lost", c)
	}
}

func TestRecoveryAfterCrashWithIntent(t *testing.T) {
	// Whether or not the refresh reached upstream, the broker cannot know:
	// it never presents that refresh token again (reuse detection would
	// take it for theft) but revokes it and signs in once.
	for _, tc := range []struct {
		name         string
		spent        bool
		wantPassword int
	}{
		{"refresh not spent", false, 1},
		{"refresh spent", true, 1},
	} {
		t.Run(tc.name, func(t *testing.T) {
			e := newEnv(t)
			e.create()
			// Simulate a crash after the intent was written: write an intent
			// record as the broker would, and (maybe) spend the token upstream.
			st := e.stored()
			st.IntentGrant, st.IntentGeneration, st.IntentTime = "refresh_token", st.Generation, e.clock.Now()
			if err := e.store.PutTokens(context.Background(), connName, st); err != nil {
				t.Fatal(err)
			}
			if tc.spent {
				spendRefreshToken(t, e, st.RefreshToken)
			}
			e.restart()
			if v := e.view(); v.Status.StateReason != broker.ReasonCrashRecovery {
				t.Errorf("state reason = %q, want %s", v.Status.StateReason, broker.ReasonCrashRecovery)
			}
			before := e.idp.Counts()
			e.b.Maintain()
			e.settle()
			after := e.idp.Counts()
			if got := after.PasswordGrants - before.PasswordGrants; got != tc.wantPassword {
				t.Errorf("password grants = %d, want %d", got, tc.wantPassword)
			}
			if after.RefreshGrants != before.RefreshGrants || after.ReuseDetected != 0 {
				t.Errorf("counts %+v -> %+v: the possibly spent refresh token was presented again", before, after)
			}
			e.mustToken()
			if st := e.stored(); st.IntentGrant != "" {
				t.Error("intent not cleared after recovery")
			}
		})
	}
}

// TestCrashMidRefreshRevokesInsteadOfReplaying: the broker stops (here: its
// store is closed under it, as a kill -9 leaves the file) while a refresh
// is at an identity server that processed it, spent the refresh token and
// revoked the access token it replaced. The restarted broker must not
// present that refresh token again (reuse detection would revoke the
// family and count it as theft) nor serve the pre-crash access token: it
// revokes the old chain and recovers with one password grant.
func TestCrashMidRefreshRevokesInsteadOfReplaying(t *testing.T) {
	e := newEnv(t, func(o *acumaticatest.Options, b *broker.Options) {
		o.RevokeAccessOnRefresh = true
		b.UpstreamTimeout = time.Second // the dead process's request gives up soon
	})
	e.create()
	old := e.mustToken()
	e.clock.Advance(50 * time.Minute)

	processed := make(chan struct{}, 1)
	e.idp.Inject(acumaticatest.Fault{Processed: processed, HoldAfterProcess: time.Minute})
	crashed, crashedStore := e.b, e.store
	t.Cleanup(crashed.Close)
	go crashed.GetAccessToken(context.Background(), connName, 15*time.Minute, "")
	<-processed // upstream spent the refresh token; its answer never arrives
	crashedStore.Close()
	if e.idp.AccessTokenValid(old.AccessToken) {
		t.Fatal("setup: the stand-in did not revoke the old access token on refresh")
	}

	e.store, e.b = nil, nil
	e.open() // the restarted process, on the same file
	before := e.idp.Counts()
	tok, err := e.token(time.Minute)
	if err != nil {
		t.Fatalf("first GetAccessToken after the restart: %v", err)
	}
	if tok.AccessToken == old.AccessToken || !e.idp.AccessTokenValid(tok.AccessToken) {
		t.Fatalf("served the pre-crash token (%v) or a dead one", tok.AccessToken == old.AccessToken)
	}
	after := e.idp.Counts()
	if after.ReuseDetected != 0 || after.RefreshGrants != before.RefreshGrants {
		t.Errorf("counts %+v -> %+v: the possibly spent refresh token was presented again", before, after)
	}
	if got := after.PasswordGrants - before.PasswordGrants; got != 1 {
		t.Errorf("password grants = %d, want 1", got)
	}
	if after.Revocations == before.Revocations {
		t.Error("the possibly spent refresh token was not revoked")
	}
	if v := e.view(); v.State != broker.StateActive || v.Status.StateReason != "" {
		t.Errorf("state %s (%s), want ACTIVE", v.State, v.Status.StateReason)
	}
	// The new chain works and stays the only one.
	e.clock.Advance(2 * time.Hour)
	e.mustToken()
	if c := e.idp.Counts(); c.ReuseDetected != 0 || c.InvalidGrant != 0 {
		t.Errorf("counts = %+v after the next refresh", c)
	}
}

// TestRestartAfterSafeFailureKeepsTheChain: a refresh that upstream
// certainly did not process (503, refused, the upstream cap) leaves no
// intent behind, so a clean restart while upstream still fails neither
// revokes a healthy refresh token nor signs its session out nor drops the
// valid access token.
func TestRestartAfterSafeFailureKeepsTheChain(t *testing.T) {
	e := newEnv(t, func(_ *acumaticatest.Options, b *broker.Options) { b.MaxAttempts = 2 })
	e.create()
	old := e.mustToken()
	e.clock.Advance(50 * time.Minute) // 10 min left
	for range 20 {
		e.idp.Inject(acumaticatest.Fault{Status: 503})
	}
	if tok, err := e.token(15 * time.Minute); err != nil || tok.AccessToken != old.AccessToken {
		t.Fatalf("err = %v, want the cached token while upstream answers 503", err)
	}
	if st := e.stored(); st.IntentGrant != "" {
		t.Errorf("intent %q kept after a 503, which upstream never processed", st.IntentGrant)
	}

	e.restart() // clean; upstream still answers 503
	before := e.idp.Counts()
	if v := e.view(); v.Status.StateReason == broker.ReasonCrashRecovery {
		t.Errorf("state reason %s after a clean restart", v.Status.StateReason)
	}
	e.b.Maintain()
	e.settle()
	tok, err := e.token(time.Minute)
	if err != nil || tok.AccessToken != old.AccessToken {
		t.Fatalf("after the restart: err = %v, want the cached token served", err)
	}
	after := e.idp.Counts()
	if after.Revocations != before.Revocations || after.Logouts != before.Logouts {
		t.Errorf("counts %+v -> %+v: a healthy chain was revoked or signed out", before, after)
	}
	// Upstream back: the same chain refreshes, no new sign-in.
	e.idp.ClearFaults()
	e.clock.Advance(time.Hour)
	e.mustToken()
	if c := e.idp.Counts(); c.PasswordGrants != 1 || c.InvalidGrant != 0 || c.ReuseDetected != 0 {
		t.Errorf("counts = %+v, want the old chain refreshed", c)
	}
}
