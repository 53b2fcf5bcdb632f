package broker_test

import (
	"context"
	"errors"
	"strings"
	"sync"
	"testing"
	"time"

	"tokenbroker/broker"
	"tokenbroker/broker/acumaticatest"
)

// Tests of upstream failures: each class, its backoff, and what callers
// get meanwhile.

func TestInvalidGrantOnRefreshFallsBackToOnePasswordGrant(t *testing.T) {
	e := newEnv(t)
	e.create()
	e.idp.RevokeRefreshTokens()
	e.clock.Advance(2 * time.Hour)
	tok := e.mustToken()
	c := e.idp.Counts()
	if c.PasswordGrants != 2 || c.RefreshGrants != 1 {
		t.Errorf("counts = %+v, want 1 failed refresh then 1 password grant (2 in all with create)", c)
	}
	if !e.idp.AccessTokenValid(tok.AccessToken) {
		t.Error("token not live")
	}
	if v := e.view(); v.State != broker.StateActive || !v.Status.HasRefreshToken {
		t.Errorf("state %s, has refresh %v", v.State, v.Status.HasRefreshToken)
	}
}

func TestChangedPasswordHaltsAfterOnePasswordGrant(t *testing.T) {
	e := newEnv(t)
	e.create()
	e.idp.AddUser(username, "changed-by-someone") // ends sessions, revokes refresh tokens
	e.clock.Advance(2 * time.Hour)
	before := e.idp.Counts()
	var wg sync.WaitGroup
	errs := make([]error, 20)
	for i := range 20 {
		wg.Add(1)
		go func() {
			defer wg.Done()
			_, errs[i] = e.token(time.Minute)
		}()
	}
	wg.Wait()
	for i := range 20 { // and 20 more, one after the other
		_, err := e.token(time.Minute)
		if !errors.Is(err, broker.ErrCredentialsRejected) {
			t.Fatalf("sequential call %d: err = %v, want ErrCredentialsRejected", i, err)
		}
	}
	for i, err := range errs {
		if !errors.Is(err, broker.ErrCredentialsRejected) {
			t.Errorf("caller %d: err = %v, want ErrCredentialsRejected", i, err)
		}
	}
	after := e.idp.Counts()
	if got := after.PasswordGrants - before.PasswordGrants; got > 1 {
		t.Errorf("password grants = %d, want at most 1", got)
	}
	if got := after.RefreshGrants - before.RefreshGrants; got != 1 {
		t.Errorf("refresh grants = %d, want 1", got)
	}
	v := e.view()
	if v.State != broker.StateNeedsReauth || v.Status.StateReason != broker.ReasonCredentialsRejected {
		t.Errorf("state = %s (%s), want NEEDS_REAUTH (CREDENTIALS_REJECTED)", v.State, v.Status.StateReason)
	}
	// The halt survives a restart: no upstream call after it either.
	e.restart()
	e.b.Maintain()
	if _, err := e.token(time.Minute); !errors.Is(err, broker.ErrCredentialsRejected) {
		t.Errorf("after restart: err = %v", err)
	}
	e.settle()
	if got := e.idp.Counts(); got.PasswordGrants != after.PasswordGrants || got.RefreshGrants != after.RefreshGrants {
		t.Errorf("upstream called after NEEDS_REAUTH: %+v", got)
	}
	// An operator fixes the password: the connection is ACTIVE again.
	e.idp.AddUser(username, password)
	p := &storageConn{Password: password}
	if _, err := e.b.UpdateConnection(context.Background(), connName, p, []string{"password"}, "", false); err != nil {
		t.Fatalf("UpdateConnection: %v", err)
	}
	if v := e.view(); v.State != broker.StateActive {
		t.Errorf("state after update = %s, want ACTIVE", v.State)
	}
	e.mustToken()
}

func TestInvalidClientHalts(t *testing.T) {
	e := newEnv(t)
	e.create()
	e.idp.AddClient(clientID, "rotated-away")
	e.clock.Advance(2 * time.Hour)
	for range 5 {
		if _, err := e.token(time.Minute); !errors.Is(err, broker.ErrCredentialsRejected) {
			t.Fatalf("err = %v", err)
		}
	}
	c := e.idp.Counts()
	if c.InvalidClient != 1 || c.PasswordGrants != 1 {
		t.Errorf("counts = %+v, want the one refresh that was rejected (invalid_client) and no password grant", c)
	}
	if v := e.view(); v.State != broker.StateNeedsReauth || v.Status.StateReason != broker.ReasonClientRejected {
		t.Errorf("state %s reason %s", v.State, v.Status.StateReason)
	}
}

func TestUpstreamOutageServesCachedToken(t *testing.T) {
	e := newEnv(t)
	e.create()
	first := e.mustToken()
	e.clock.Advance(50 * time.Minute) // 10 min left
	for range 10 {
		e.idp.Inject(acumaticatest.Fault{Status: 503, Body: "<html>down</html>", ContentType: "text/html"})
	}
	tok, err := e.token(15 * time.Minute) // asks for more than is left
	if err != nil {
		t.Fatalf("err = %v, want the still-valid cached token", err)
	}
	if tok.AccessToken != first.AccessToken {
		t.Error("did not serve the cached token")
	}
	v := e.view()
	if v.State != broker.StateDegraded || v.Status.LastErrorCode != broker.ReasonUpstreamUnavailable {
		t.Errorf("state = %s (%s), want DEGRADED (UPSTREAM_UNAVAILABLE)", v.State, v.Status.LastErrorCode)
	}
	// While backing off, callers get the cached token without upstream calls.
	c := e.idp.Counts()
	if _, err := e.token(15 * time.Minute); err != nil {
		t.Fatal(err)
	}
	if got := e.idp.Counts(); got.Faults != c.Faults || got.RefreshGrants != c.RefreshGrants {
		t.Errorf("upstream called during backoff: %+v -> %+v", c, got)
	}
	// Once the token is gone and upstream still down: UNAVAILABLE with a retry delay.
	e.clock.Advance(11 * time.Minute)
	_, err = e.token(time.Minute)
	var be *broker.Error
	if !errors.Is(err, broker.ErrUpstreamUnavailable) || !errors.As(err, &be) || be.RetryAfter <= 0 {
		t.Fatalf("err = %v, want ErrUpstreamUnavailable with RetryAfter", err)
	}
	// Upstream back: the next call after the backoff recovers.
	e.idp.ClearFaults()
	e.clock.Advance(time.Hour)
	if _, err := e.token(time.Minute); err != nil {
		t.Fatalf("after recovery: %v", err)
	}
	if v := e.view(); v.State != broker.StateActive {
		t.Errorf("state = %s, want ACTIVE", v.State)
	}
	if got := e.idp.Counts(); got.PasswordGrants != 1 || got.InvalidGrant != 0 {
		t.Errorf("recovery used a password grant or spent a refresh token: %+v", got)
	}
}

func TestRetryAfterHonoured(t *testing.T) {
	e := newEnv(t, func(_ *acumaticatest.Options, b *broker.Options) { b.MaxAttempts = 1 })
	e.create()
	e.clock.Advance(2 * time.Hour)
	e.idp.Inject(acumaticatest.Fault{Status: 429, RetryAfter: "120", Body: `{"error":"too_many_requests"}`})
	_, err := e.token(time.Minute)
	var be *broker.Error
	if !errors.As(err, &be) || be.RetryAfter < 120*time.Second || be.Reason != broker.ReasonUpstreamRateLimited {
		t.Fatalf("err = %v (%+v), want RetryAfter >= 120s with reason UPSTREAM_RATE_LIMITED", err, be)
	}
	// Within the Retry-After window no request goes upstream.
	e.clock.Advance(60 * time.Second)
	e.token(time.Minute)
	if got := e.idp.Counts().RefreshGrants; got != 0 {
		t.Errorf("refresh grants = %d within Retry-After (the 429 was a fault before processing)", got)
	}
	e.clock.Advance(61 * time.Second)
	if _, err := e.token(time.Minute); err != nil {
		t.Fatalf("after Retry-After: %v", err)
	}
}

func TestRetriesTransientFailuresWithinOneSharedRefresh(t *testing.T) {
	var slept []time.Duration
	var mu sync.Mutex
	e := newEnv(t, func(_ *acumaticatest.Options, b *broker.Options) {
		b.MaxAttempts = 4
		b.BackoffBase = 100 * time.Millisecond
		b.BackoffMax = time.Second
		b.Sleep = func(_ context.Context, d time.Duration) error {
			mu.Lock()
			slept = append(slept, d)
			mu.Unlock()
			return nil
		}
	})
	e.create()
	e.clock.Advance(2 * time.Hour)
	// Failures upstream certainly did not process: the same refresh token
	// is retried (ambiguous ones: TestAmbiguousRefreshIsNeverReplayed).
	e.idp.Inject(
		acumaticatest.Fault{Status: 503, Body: "<html><body>Service Unavailable</body></html>", ContentType: "text/html"},
		acumaticatest.Fault{Status: 503, RetryAfter: "3"},
		acumaticatest.Fault{Status: 429},
	)
	if _, err := e.token(time.Minute); err != nil {
		t.Fatalf("err = %v, want success on the 4th attempt", err)
	}
	mu.Lock()
	defer mu.Unlock()
	if len(slept) != 3 {
		t.Fatalf("slept %v, want 3 backoffs", slept)
	}
	if slept[1] < 3*time.Second {
		t.Errorf("second backoff %v ignores Retry-After: 3", slept[1])
	}
	if slept[0] < 50*time.Millisecond || slept[0] > 100*time.Millisecond {
		t.Errorf("first backoff %v, want jittered in [50ms, 100ms]", slept[0])
	}
	if c := e.idp.Counts(); c.PasswordGrants != 1 {
		t.Errorf("password grants = %d; a 503/429 must not lead to a password grant", c.PasswordGrants)
	}
}

func TestLoginLimitIsItsOwnClass(t *testing.T) {
	e := newEnv(t, func(o *acumaticatest.Options, _ *broker.Options) { o.MaxSessions = 1 })
	e.create()
	// Someone else signs in as the integration user and the chain dies.
	e.idp.RevokeRefreshTokens()
	e.idp.Inject(acumaticatest.Fault{Status: 429, Body: `{"error":"invalid_grant","error_description":"API Login Limit"}`, Process: false})
	e.clock.Advance(2 * time.Hour)
	_, err := e.token(time.Minute)
	var be *broker.Error
	if !errors.Is(err, broker.ErrLoginLimit) || !errors.As(err, &be) || be.RetryAfter < 30*time.Second {
		t.Fatalf("err = %v, want ErrLoginLimit with a long RetryAfter", err)
	}
	if v := e.view(); v.Status.LastErrorCode != broker.ReasonLoginLimit || v.State == broker.StateNeedsReauth {
		t.Errorf("state %s code %s", v.State, v.Status.LastErrorCode)
	}
}

func TestUnusableAnswersKeepRotatedRefreshToken(t *testing.T) {
	for _, tc := range []struct {
		name   string
		mutate func(map[string]any)
	}{
		{"missing access_token", func(m map[string]any) { delete(m, "access_token") }},
		{"negative expires_in", func(m map[string]any) { m["expires_in"] = -5 }},
		{"absurd expires_in", func(m map[string]any) { m["expires_in"] = 1e12 }},
		{"zero expires_in", func(m map[string]any) { m["expires_in"] = 0 }},
		{"non-numeric expires_in", func(m map[string]any) { m["expires_in"] = "soon" }},
		{"fractional expires_in", func(m map[string]any) { m["expires_in"] = 2.5 }},
	} {
		t.Run(tc.name, func(t *testing.T) {
			e := newEnv(t, func(_ *acumaticatest.Options, b *broker.Options) { b.MaxAttempts = 2 })
			e.create()
			e.clock.Advance(2 * time.Hour)
			e.idp.Inject(acumaticatest.Fault{Mutate: tc.mutate})
			tok, err := e.token(time.Minute)
			if err != nil {
				t.Fatalf("err = %v, want success on retry", err)
			}
			c := e.idp.Counts()
			if c.RefreshGrants != 2 || c.InvalidGrant != 0 || c.PasswordGrants != 1 {
				t.Errorf("counts = %+v: the retry must use the rotated refresh token from the unusable answer", c)
			}
			if !e.idp.AccessTokenValid(tok.AccessToken) {
				t.Error("token not live")
			}
		})
	}
}

func TestRedirectNotFollowed(t *testing.T) {
	e := newEnv(t, func(_ *acumaticatest.Options, b *broker.Options) { b.MaxAttempts = 1 })
	e.create()
	e.clock.Advance(2 * time.Hour)
	other := acumaticatest.New(acumaticatest.Options{})
	otherSrv := other.Start()
	defer otherSrv.Close()
	e.idp.Inject(acumaticatest.Fault{Redirect: otherSrv.URL + "/identity/connect/token"})
	if _, err := e.token(time.Minute); !errors.Is(err, broker.ErrUpstreamUnavailable) {
		t.Fatalf("err = %v, want ErrUpstreamUnavailable", err)
	}
	if c := other.Counts(); c.RefreshGrants+c.PasswordGrants+c.InvalidClient != 0 {
		t.Errorf("credentials followed the redirect: %+v", c)
	}
}

// TestAmbiguousRefreshIsNeverReplayed: when the answer to a refresh leaves
// unknown whether upstream spent the refresh token (a 5xx that may come
// after processing, a timeout or reset after sending), that refresh token is
// never presented again: reuse detection would take it for theft and revoke
// the family. It is revoked (harmless if spent), its session signed out,
// and exactly one password grant recovers.
func TestAmbiguousRefreshIsNeverReplayed(t *testing.T) {
	for _, tc := range []struct {
		name  string
		fault acumaticatest.Fault
	}{
		{"504 after processing", acumaticatest.Fault{Process: true, Status: 504}},
		{"500 after processing", acumaticatest.Fault{Process: true, Status: 500}},
		{"502 before processing", acumaticatest.Fault{Status: 502}},
		{"reset after processing", acumaticatest.Fault{Process: true, Reset: true}},
		{"timeout after processing", acumaticatest.Fault{HoldAfterProcess: time.Minute}},
		{"timeout before processing", acumaticatest.Fault{Hang: true}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			e := newEnv(t, func(_ *acumaticatest.Options, b *broker.Options) {
				b.UpstreamTimeout = 100 * time.Millisecond
				b.MaxAttempts = 2
			})
			e.create()
			e.clock.Advance(2 * time.Hour)
			e.idp.Inject(tc.fault)
			tok, err := e.token(time.Minute)
			if err != nil {
				t.Fatalf("err = %v", err)
			}
			e.b.Settle() // the revocation and the old session's sign-out run on their own
			c := e.idp.Counts()
			if c.ReuseDetected != 0 || c.InvalidGrant != 0 {
				t.Errorf("counts = %+v: the possibly spent refresh token was presented again", c)
			}
			if c.PasswordGrants != 2 { // the create's and the recovery's
				t.Errorf("password grants = %d, want exactly one recovery password grant", c.PasswordGrants-1)
			}
			if c.Revocations != 1 || c.Logouts != 1 {
				t.Errorf("counts = %+v, want the set-aside refresh token revoked and the old session signed out once", c)
			}
			if !e.idp.AccessTokenValid(tok.AccessToken) {
				t.Error("token not live")
			}
			if st := e.stored(); st.IntentGrant != "" || st.RefreshToken == "" {
				t.Errorf("stored intent %q, has refresh token %v: want the new chain, no intent", st.IntentGrant, st.RefreshToken != "")
			}
			// The new chain refreshes as usual.
			e.clock.Advance(2 * time.Hour)
			e.mustToken()
			if c := e.idp.Counts(); c.ReuseDetected != 0 || c.InvalidGrant != 0 || c.PasswordGrants != 2 {
				t.Errorf("counts = %+v after the next refresh", c)
			}
		})
	}
}

func TestIntentWriteFailureMakesNoUpstreamCall(t *testing.T) {
	e := newEnv(t)
	e.create()
	old := e.mustToken()
	e.clock.Advance(50 * time.Minute)
	e.fs.setFail(-1)
	tok, err := e.token(15 * time.Minute)
	if err != nil || tok.AccessToken != old.AccessToken {
		t.Fatalf("err = %v, want the cached token", err)
	}
	if c := e.idp.Counts(); c.RefreshGrants != 0 {
		t.Errorf("refresh grants = %d with an unwritable store, want 0", c.RefreshGrants)
	}
	e.clock.Advance(11 * time.Minute)
	if _, err := e.token(time.Minute); !errors.Is(err, broker.ErrStorage) && !errors.Is(err, broker.ErrUpstreamUnavailable) {
		t.Errorf("err = %v, want a storage error", err)
	}
	e.fs.setFail(0)
}

func TestPasswordGrant429IsLoginLimit(t *testing.T) {
	e := newEnv(t)
	e.create()
	e.idp.RevokeRefreshTokens()
	e.idp.Inject(
		acumaticatest.Fault{Mutate: func(map[string]any) {}}, // the refresh grant passes (and fails invalid_grant)
		acumaticatest.Fault{Status: 429, RetryAfter: "600", Body: `{"error":"too_many_requests"}`},
	)
	e.clock.Advance(2 * time.Hour)
	_, err := e.token(time.Minute)
	var be *broker.Error
	if !errors.Is(err, broker.ErrLoginLimit) || !errors.As(err, &be) || be.RetryAfter < 600*time.Second {
		t.Fatalf("err = %v, want ErrLoginLimit honouring Retry-After", err)
	}
	// No further sign-in attempt while the login limit backoff runs.
	before := e.idp.Counts()
	for range 5 {
		e.token(time.Minute)
	}
	if got := e.idp.Counts(); got.PasswordGrants != before.PasswordGrants || got.Faults != before.Faults {
		t.Errorf("sign-ins during login-limit backoff: %+v -> %+v", before, got)
	}
}

func TestUpstreamHangPastDeadline(t *testing.T) {
	e := newEnv(t, func(_ *acumaticatest.Options, b *broker.Options) {
		b.UpstreamTimeout = 100 * time.Millisecond
		b.MaxAttempts = 2
	})
	e.create()
	first := e.mustToken()
	e.clock.Advance(50 * time.Minute)
	e.idp.Inject(acumaticatest.Fault{Hang: true}, acumaticatest.Fault{Hang: true})
	// A hang after the request was sent is ambiguous: the refresh token may
	// be spent, so it is set aside (revoked, never presented again) and a
	// password grant tried, which hangs too. A valid token exists and its
	// session is not signed out before a new chain exists: the caller gets
	// it although upstream hangs.
	tok, err := e.token(15 * time.Minute)
	if err != nil || tok.AccessToken != first.AccessToken {
		t.Fatalf("err = %v, want the cached token", err)
	}
	e.b.Settle()
	if !e.idp.AccessTokenValid(first.AccessToken) {
		t.Error("the cached token's session was signed out before a new chain existed")
	}
	if v := e.view(); v.State != broker.StateDegraded || v.Status.HasRefreshToken {
		t.Errorf("state = %s, has refresh token %v, want DEGRADED with the refresh token set aside", v.State, v.Status.HasRefreshToken)
	}
	// Upstream answers again: one password grant, the hung refresh token is
	// never presented again, and the old session is signed out after the
	// new chain is committed.
	e.clock.Advance(time.Hour)
	if _, err := e.token(time.Minute); err != nil {
		t.Fatalf("after the hang: %v", err)
	}
	e.b.Settle()
	if c := e.idp.Counts(); c.PasswordGrants != 2 || c.InvalidGrant != 0 || c.RefreshGrants != 0 || c.ReuseDetected != 0 || c.Revocations != 1 || c.Logouts != 1 {
		t.Errorf("counts = %+v, want one recovery password grant, no refresh grant, the set-aside token revoked and the old session signed out", c)
	}
	if e.idp.AccessTokenValid(first.AccessToken) {
		t.Error("the old session was not signed out after the new chain was committed")
	}
}

func TestRefreshTokenMissingHaltsWithoutSeatStorm(t *testing.T) {
	e := newEnv(t)
	e.create()
	// offline_access is taken off the application and the chain dies.
	e.idp.SetNoRefreshTokens(true)
	e.idp.RevokeRefreshTokens()
	e.clock.Advance(2 * time.Hour)
	tok, err := e.token(time.Minute)
	if err != nil || !e.idp.AccessTokenValid(tok.AccessToken) {
		t.Fatalf("err = %v, want the live access token of the password grant", err)
	}
	v := e.view()
	if v.State != broker.StateRefreshTokenMissing || v.Status.HasRefreshToken {
		t.Errorf("state = %s, has refresh token %v", v.State, v.Status.HasRefreshToken)
	}
	// Once that token expires, no password grant per hour: callers are told why.
	before := e.idp.Counts()
	e.clock.Advance(2 * time.Hour)
	for range 5 {
		if _, err := e.token(time.Minute); !errors.Is(err, broker.ErrRefreshTokenMissing) {
			t.Fatalf("err = %v, want ErrRefreshTokenMissing", err)
		}
	}
	if got := e.idp.Counts(); got.PasswordGrants != before.PasswordGrants {
		t.Errorf("password grants after REFRESH_TOKEN_MISSING: %d -> %d", before.PasswordGrants, got.PasswordGrants)
	}
}

func TestPasswordGrantRetriedOnlyWhenNotProcessed(t *testing.T) {
	for _, tc := range []struct {
		name    string
		fault   acumaticatest.Fault
		wantErr bool
	}{
		// The 503 comes before processing: no session opened, the broker signs in again.
		{"503 before processing is retried", acumaticatest.Fault{Status: 503}, false},
		// The 502 comes after processing: a session may be open, no second sign-in now.
		{"502 after processing is not repeated", acumaticatest.Fault{Status: 502, Process: true}, true},
	} {
		t.Run(tc.name, func(t *testing.T) {
			e := newEnv(t, func(_ *acumaticatest.Options, b *broker.Options) { b.MaxAttempts = 4 })
			e.create()
			e.idp.RevokeRefreshTokens()
			// The refresh grant passes through (and gets invalid_grant); the
			// password grant meets the fault.
			e.idp.Inject(acumaticatest.Fault{Mutate: func(map[string]any) {}}, tc.fault)
			e.clock.Advance(2 * time.Hour)
			before := e.idp.Counts()
			_, err := e.token(time.Minute)
			after := e.idp.Counts()
			// Either way exactly one password grant was processed upstream.
			if got := after.PasswordGrants - before.PasswordGrants; got != 1 {
				t.Errorf("password grants processed = %d, want 1", got)
			}
			if !tc.wantErr {
				if err != nil {
					t.Fatalf("err = %v", err)
				}
				return
			}
			if !errors.Is(err, broker.ErrUpstreamUnavailable) {
				t.Fatalf("err = %v, want ErrUpstreamUnavailable (never CREDENTIALS_REJECTED)", err)
			}
			if v := e.view(); v.State == broker.StateNeedsReauth {
				t.Error("an unknown outcome halted the connection")
			}
		})
	}
}

// TestEchoedTokenTypeIsScrubbed: a 200 answer whose token_type echoes a
// secret of the request is unusable, and the error that names it (the
// connection's last error, the log) holds no secret.
func TestEchoedTokenTypeIsScrubbed(t *testing.T) {
	e := newEnv(t, func(_ *acumaticatest.Options, b *broker.Options) { b.MaxAttempts = 1 })
	e.create()
	e.clock.Advance(2 * time.Hour)
	e.idp.Inject(acumaticatest.Fault{Mutate: func(m map[string]any) { m["token_type"] = clientSecret }})
	_, err := e.token(time.Minute)
	if err == nil {
		t.Fatal("an answer with token_type other than Bearer was taken")
	}
	if !strings.Contains(err.Error(), "token_type") {
		t.Errorf("err = %q: want token_type named", err)
	}
	for _, text := range []string{err.Error(), e.view().Status.LastErrorMessage} {
		if strings.Contains(text, clientSecret[:12]) {
			t.Errorf("error %q holds the client secret", text)
		}
	}
}

// TestShortSecretWithholdsUpstreamText: a secret shorter than scrub can
// look for (here a three-character password) could be echoed unnoticed, so
// no upstream description reaches the error at all.
func TestShortSecretWithholdsUpstreamText(t *testing.T) {
	const short = "x9Q"
	e := newEnv(t)
	e.idp.AddUser(username, short)
	e.idp.Inject(acumaticatest.Fault{Status: 400, Body: `{"error":"invalid_grant","error_description":"user integration with password x9Q is locked"}`})
	cfg := e.conn()
	cfg.Password = short
	_, err := e.b.CreateConnection(context.Background(), cfg, false)
	if !errors.Is(err, broker.ErrCredentialsRejected) {
		t.Fatalf("err = %v, want ErrCredentialsRejected", err)
	}
	if strings.Contains(err.Error(), short) || strings.Contains(err.Error(), "is locked") {
		t.Errorf("err = %q: upstream text shown although a secret is too short to scrub", err)
	}
}

// A refresh token set aside after an ambiguous answer is revoked when the
// connection is deleted before a new chain replaced it: it must not stay
// valid upstream, unused, until its idle window lapses.
func TestDeleteRevokesASetAsideRefreshToken(t *testing.T) {
	e := newEnv(t, func(_ *acumaticatest.Options, b *broker.Options) {
		b.UpstreamTimeout = 100 * time.Millisecond
		b.MaxAttempts = 2
	})
	e.create()
	e.mustToken()
	e.clock.Advance(50 * time.Minute)
	e.idp.Inject(acumaticatest.Fault{Hang: true}, acumaticatest.Fault{Hang: true})
	if _, err := e.token(15 * time.Minute); err != nil {
		t.Fatalf("err = %v, want the cached token", err)
	}
	e.b.Settle()
	if c := e.idp.Counts(); c.Revocations != 0 {
		t.Fatalf("counts = %+v: revoked before a new chain existed", c)
	}
	if err := e.b.DeleteConnection(context.Background(), connName, ""); err != nil {
		t.Fatal(err)
	}
	if c := e.idp.Counts(); c.Revocations != 1 || c.Logouts != 1 {
		t.Errorf("counts = %+v, want the set-aside refresh token revoked and the session signed out", c)
	}
}
