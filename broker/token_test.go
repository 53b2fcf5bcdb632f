package broker_test

import (
	"context"
	"errors"
	"fmt"
	"net/http"
	"net/http/httptest"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"tokenbroker/broker"
	"tokenbroker/broker/acumaticatest"
	"tokenbroker/storage"
)

func TestCreateProvesCredentialsWithOnePasswordGrant(t *testing.T) {
	e := newEnv(t)
	v := e.create()
	if got := e.idp.Counts().PasswordGrants; got != 1 {
		t.Errorf("password grants = %d, want 1", got)
	}
	if v.State != broker.StateActive || !v.Status.HasRefreshToken || !v.ClientSecretSet || !v.PasswordSet {
		t.Errorf("view = %+v, want ACTIVE with refresh token and secrets set", v)
	}
	if v.Conn.ClientSecret != "" || v.Conn.Password != "" {
		t.Error("view carries a secret")
	}
	tok := e.mustToken()
	if got := e.idp.Counts(); got.PasswordGrants != 1 || got.RefreshGrants != 0 {
		t.Errorf("after cached GetAccessToken: counts = %+v, want 1 password grant and no refresh", got)
	}
	if !e.idp.AccessTokenValid(tok.AccessToken) {
		t.Error("served token is not live upstream")
	}
	if st := e.stored(); st.RefreshToken == "" || st.Generation != 1 {
		t.Errorf("stored tokens = gen %d, refresh set %v; want gen 1 with refresh token", st.Generation, st.RefreshToken != "")
	}
}

func TestCreateRejectedCredentialsStoresNothing(t *testing.T) {
	for _, tc := range []struct {
		name   string
		mutate func(c *storageConn)
		reason string
	}{
		{"wrong password", func(c *storageConn) { c.Password = "wrong" }, broker.ReasonCredentialsRejected},
		{"wrong secret", func(c *storageConn) { c.ClientSecret = "wrong" }, broker.ReasonClientRejected},
		{"unknown client", func(c *storageConn) { c.ClientID = "88358B02-A48D-A50E-F710-39C1636C30F6@Other" }, broker.ReasonClientRejected},
	} {
		t.Run(tc.name, func(t *testing.T) {
			e := newEnv(t)
			c := e.conn()
			tc.mutate(c)
			_, err := e.b.CreateConnection(context.Background(), c, false)
			var be *broker.Error
			if !errors.Is(err, broker.ErrCredentialsRejected) || !errors.As(err, &be) || be.Reason != tc.reason {
				t.Fatalf("err = %v, want ErrCredentialsRejected with reason %s", err, tc.reason)
			}
			if _, err := e.store.GetConnection(context.Background(), connName); err == nil {
				t.Error("rejected connection was stored")
			}
			if _, err := e.b.GetConnection(context.Background(), connName); !errors.Is(err, broker.ErrNotFound) {
				t.Errorf("GetConnection err = %v, want ErrNotFound", err)
			}
		})
	}
}

func TestCreateWithoutOfflineAccessFails(t *testing.T) {
	e := newEnv(t, func(o *acumaticatest.Options, _ *broker.Options) { o.NoRefreshTokens = true })
	_, err := e.b.CreateConnection(context.Background(), e.conn(), false)
	if !errors.Is(err, broker.ErrRefreshTokenMissing) {
		t.Fatalf("err = %v, want ErrRefreshTokenMissing", err)
	}
	if _, err := e.store.GetConnection(context.Background(), connName); err == nil {
		t.Error("connection stored despite missing refresh token")
	}
}

func TestThunderingHerdOneUpstreamCall(t *testing.T) {
	e := newEnv(t)
	e.create()
	e.clock.Advance(2 * time.Hour) // the access token has expired
	before := e.idp.Counts()
	const n = 1000
	var wg sync.WaitGroup
	tokens := make([]string, n)
	errs := make([]error, n)
	start := make(chan struct{})
	for i := range n {
		wg.Add(1)
		go func() {
			defer wg.Done()
			<-start
			tok, err := e.token(time.Minute)
			tokens[i], errs[i] = tok.AccessToken, err
		}()
	}
	close(start)
	wg.Wait()
	after := e.idp.Counts()
	if got := after.RefreshGrants - before.RefreshGrants; got != 1 {
		t.Errorf("refresh grants = %d, want exactly 1", got)
	}
	if got := after.PasswordGrants - before.PasswordGrants; got != 0 {
		t.Errorf("password grants = %d, want 0", got)
	}
	if after.MaxConcurrentUser != 1 {
		t.Errorf("max concurrent token requests = %d, want 1", after.MaxConcurrentUser)
	}
	for i := range n {
		if errs[i] != nil {
			t.Fatalf("caller %d: %v", i, errs[i])
		}
		if tokens[i] != tokens[0] {
			t.Fatalf("caller %d got a different token", i)
		}
	}
	if !e.idp.AccessTokenValid(tokens[0]) {
		t.Error("shared token not live upstream")
	}
}

func TestRotatedRefreshTokenCommittedBeforeHandout(t *testing.T) {
	e := newEnv(t)
	e.create()
	gen := e.stored().Generation
	e.clock.Advance(2 * time.Hour)
	tok := e.mustToken()
	st := e.stored()
	if st.Generation != gen+1 || st.AccessToken != tok.AccessToken {
		t.Errorf("stored gen %d (want %d), stored access token matches served: %v", st.Generation, gen+1, st.AccessToken == tok.AccessToken)
	}
	if st.IntentGrant != "" {
		t.Errorf("intent %q left after commit", st.IntentGrant)
	}
	// The committed refresh token is the live one: a restart refreshes with it.
	e.restart()
	e.clock.Advance(2 * time.Hour)
	before := e.idp.Counts()
	e.mustToken()
	after := e.idp.Counts()
	if after.RefreshGrants-before.RefreshGrants != 1 || after.PasswordGrants != before.PasswordGrants || after.InvalidGrant != before.InvalidGrant {
		t.Errorf("after restart: %+v -> %+v, want one successful refresh", before, after)
	}
}

func TestCallerDeadlineDoesNotLoseRotatedRefreshToken(t *testing.T) {
	e := newEnv(t)
	e.create()
	e.clock.Advance(2 * time.Hour)
	e.idp.Inject(acumaticatest.Fault{Delay: 300 * time.Millisecond, Mutate: func(map[string]any) {}})
	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Millisecond)
	_, err := e.b.GetAccessToken(ctx, connName, time.Minute, "")
	cancel()
	if !errors.Is(err, context.DeadlineExceeded) {
		t.Fatalf("err = %v, want deadline exceeded", err)
	}
	// A patient caller joins the same shared refresh.
	tok := e.mustToken()
	c := e.idp.Counts()
	if c.RefreshGrants != 1 || c.InvalidGrant != 0 || c.PasswordGrants != 1 {
		t.Errorf("counts = %+v, want exactly one refresh and no failures", c)
	}
	if st := e.stored(); st.AccessToken != tok.AccessToken || st.Generation != 2 {
		t.Errorf("late reply not committed: gen %d", st.Generation)
	}
}

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
	e.idp.Inject(
		acumaticatest.Fault{Status: 502, Body: "<html><body>Bad Gateway</body></html>", ContentType: "text/html"},
		acumaticatest.Fault{Status: 503, RetryAfter: "3"},
		acumaticatest.Fault{Reset: true},
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
		t.Errorf("password grants = %d; a 502/reset must not lead to a password grant when the token survives", c.PasswordGrants)
	}
}

func TestRejectedAccessTokenOneRefreshForAllReporters(t *testing.T) {
	e := newEnv(t, func(o *acumaticatest.Options, _ *broker.Options) { o.RevokeAccessOnRefresh = true })
	e.create()
	bad := e.mustToken()
	var wg sync.WaitGroup
	got := make([]string, 50)
	for i := range 50 {
		wg.Add(1)
		go func() {
			defer wg.Done()
			tok, err := e.b.GetAccessToken(context.Background(), connName, time.Minute, bad.AccessToken)
			if err != nil {
				t.Error(err)
			}
			got[i] = tok.AccessToken
		}()
	}
	wg.Wait()
	if c := e.idp.Counts(); c.RefreshGrants != 1 {
		t.Errorf("refresh grants = %d, want 1 for 50 reports of one token", c.RefreshGrants)
	}
	for i, tok := range got {
		if tok == bad.AccessToken || tok != got[0] {
			t.Fatalf("reporter %d got the rejected or a different token", i)
		}
	}
	// Normal callers no longer get the rejected token either.
	if tok := e.mustToken(); tok.AccessToken != got[0] {
		t.Error("normal caller got a different token")
	}
	// A report of an older token is answered with the current one, no call.
	tok, err := e.b.GetAccessToken(context.Background(), connName, time.Minute, bad.AccessToken)
	if err != nil || tok.AccessToken != got[0] {
		t.Errorf("stale report: %v", err)
	}
	if c := e.idp.Counts(); c.RefreshGrants != 1 {
		t.Errorf("refresh grants = %d after a stale report, want 1", c.RefreshGrants)
	}
}

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
	e.clock.Advance(7 * 24 * time.Hour) // day 28+: inside the last 48 h before the deadline, idle
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

func TestTimeoutAfterSendIsAmbiguousAndRecovers(t *testing.T) {
	e := newEnv(t, func(_ *acumaticatest.Options, b *broker.Options) {
		b.UpstreamTimeout = 100 * time.Millisecond
		b.MaxAttempts = 2
	})
	e.create()
	e.clock.Advance(2 * time.Hour)
	// The first refresh is processed upstream, but the answer never arrives.
	e.idp.Inject(acumaticatest.Fault{Process: true, Hang: false, Delay: 0, Status: 504})
	tok, err := e.token(time.Minute)
	if err != nil {
		t.Fatalf("err = %v", err)
	}
	c := e.idp.Counts()
	// The spent refresh token is retried once (invalid_grant, reuse detected),
	// then exactly one password grant recovers.
	if c.PasswordGrants != 2 || c.ReuseDetected != 1 {
		t.Errorf("counts = %+v, want one reuse detection and one recovery password grant", c)
	}
	if !e.idp.AccessTokenValid(tok.AccessToken) {
		t.Error("token not live")
	}
}

func TestDeleteRevokesAndSignsOut(t *testing.T) {
	e := newEnv(t)
	e.create()
	tok := e.mustToken()
	if err := e.b.DeleteConnection(context.Background(), connName, ""); err != nil {
		t.Fatal(err)
	}
	c := e.idp.Counts()
	if c.Revocations != 1 || c.Logouts != 1 || c.OpenSessions != 0 {
		t.Errorf("counts = %+v, want 1 revocation, 1 logout, no open session", c)
	}
	if e.idp.AccessTokenValid(tok.AccessToken) {
		t.Error("access token still live after delete")
	}
	if _, err := e.store.GetTokens(context.Background(), connName); err == nil {
		t.Error("tokens still stored")
	}
	if _, err := e.token(time.Minute); !errors.Is(err, broker.ErrNotFound) {
		t.Errorf("err = %v, want ErrNotFound", err)
	}
}

func TestUpdateSecretProvenBeforeReplace(t *testing.T) {
	e := newEnv(t)
	v := e.create()
	// A wrong new secret changes nothing.
	_, err := e.b.UpdateConnection(context.Background(), connName, &storageConn{ClientSecret: "not-the-new-one"}, []string{"client_secret"}, v.ETag, false)
	if !errors.Is(err, broker.ErrCredentialsRejected) {
		t.Fatalf("err = %v, want ErrCredentialsRejected", err)
	}
	if got := e.view(); got.ETag != v.ETag {
		t.Error("rejected update changed the connection")
	}
	stored, _ := e.store.GetConnection(context.Background(), connName)
	if stored.ClientSecret != clientSecret {
		t.Error("rejected secret was stored")
	}
	// Rotation: a second secret is added upstream, then given to the broker.
	e.idp.AddClient(clientID, "second-secret-value")
	nv, err := e.b.UpdateConnection(context.Background(), connName, &storageConn{ClientSecret: "second-secret-value"}, []string{"client_secret"}, v.ETag, false)
	if err != nil {
		t.Fatal(err)
	}
	if nv.ETag == v.ETag {
		t.Error("etag unchanged")
	}
	// A stale etag is a conflict.
	if _, err := e.b.UpdateConnection(context.Background(), connName, &storageConn{DisplayName: "x"}, []string{"display_name"}, v.ETag, false); !errors.Is(err, broker.ErrConflict) {
		t.Errorf("stale etag: err = %v, want ErrConflict", err)
	}
	e.clock.Advance(2 * time.Hour)
	e.mustToken()
	if c := e.idp.Counts(); c.InvalidClient != 1 || c.InvalidGrant != 0 {
		t.Errorf("counts = %+v", c)
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
	failAfterIntent := &onceAfter{fs: e.fs}
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

func TestDiscoveryEndpointsUsedSameOriginOnly(t *testing.T) {
	e := newEnv(t)
	var altHits atomic.Int32
	inner := e.idp.Handler()
	mux := http.NewServeMux()
	var base string
	mux.HandleFunc("GET /identity/.well-known/openid-configuration", func(w http.ResponseWriter, r *http.Request) {
		fmt.Fprintf(w, `{"token_endpoint": %q, "revocation_endpoint": "http://elsewhere.invalid/revoke"}`, base+"/alt/token")
	})
	mux.HandleFunc("POST /alt/token", func(w http.ResponseWriter, r *http.Request) {
		altHits.Add(1)
		r.URL.Path = "/identity/connect/token"
		inner.ServeHTTP(w, r)
	})
	mux.Handle("/", inner)
	srv := httptest.NewServer(mux)
	defer srv.Close()
	base = srv.URL
	c := e.conn()
	c.InstanceURL = srv.URL
	if _, err := e.b.CreateConnection(context.Background(), c, false); err != nil {
		t.Fatal(err)
	}
	if altHits.Load() != 1 {
		t.Errorf("token requests at the discovered endpoint = %d, want 1", altHits.Load())
	}
	// The cross-origin revocation endpoint is ignored for the fallback path.
	if err := e.b.DeleteConnection(context.Background(), connName, ""); err != nil {
		t.Fatal(err)
	}
	if got := e.idp.Counts().Revocations; got != 1 {
		t.Errorf("revocations at the same-origin fallback = %d, want 1", got)
	}
}

// countingTransport measures how many requests are in flight at once, as
// the broker sees them.
type countingTransport struct {
	mu       sync.Mutex
	inflight int
	max      int
}

func (c *countingTransport) RoundTrip(r *http.Request) (*http.Response, error) {
	c.mu.Lock()
	c.inflight++
	c.max = max(c.max, c.inflight)
	c.mu.Unlock()
	defer func() {
		c.mu.Lock()
		c.inflight--
		c.mu.Unlock()
	}()
	return http.DefaultTransport.RoundTrip(r)
}

func TestGlobalUpstreamCap(t *testing.T) {
	ct := &countingTransport{}
	e := newEnv(t, func(_ *acumaticatest.Options, b *broker.Options) {
		b.Transport = ct
		b.MaxConcurrentUpstream = 2
		b.UpstreamTimeout = 300 * time.Millisecond
		b.MaxAttempts = 1
	})
	const n = 8
	for i := range n {
		c := e.conn()
		c.Name = fmt.Sprintf("tenants/t%d/connections/erp", i)
		if _, err := e.b.CreateConnection(context.Background(), c, false); err != nil {
			t.Fatal(err)
		}
	}
	e.clock.Advance(2 * time.Hour)
	arrived := make(chan struct{}, n)
	for range n {
		e.idp.Inject(acumaticatest.Fault{Arrived: arrived, Delay: time.Hour})
	}
	for i := range n {
		ctx, cancel := context.WithTimeout(context.Background(), 10*time.Millisecond)
		e.b.GetAccessToken(ctx, fmt.Sprintf("tenants/t%d/connections/erp", i), time.Minute, "")
		cancel()
	}
	e.b.Close() // waits for the 8 shared refreshes, each cut by the upstream timeout
	if got := len(arrived); got != n {
		t.Fatalf("upstream requests = %d, want %d", got, n)
	}
	ct.mu.Lock()
	defer ct.mu.Unlock()
	if ct.max != 2 {
		t.Errorf("max concurrent upstream requests = %d, want the cap of 2", ct.max)
	}
}

// TestHungHostDoesNotStarveOthers: one Acumatica server that stops
// answering holds at most its per-host share of the global upstream cap,
// so connections on other servers still refresh meanwhile.
func TestHungHostDoesNotStarveOthers(t *testing.T) {
	const global, perHost, onHung = 4, 2, 6
	e := newEnv(t, func(_ *acumaticatest.Options, b *broker.Options) {
		b.MaxConcurrentUpstream = global
		b.MaxConcurrentUpstreamPerHost = perHost
		b.MaxAttempts = 1
	})
	healthy := acumaticatest.New(acumaticatest.Options{Now: e.clock.Now})
	runIdPsMu.Lock()
	runIdPs = append(runIdPs, healthy)
	runIdPsMu.Unlock()
	healthy.AddClient(clientID, clientSecret)
	healthy.AddUser(username, password)
	hs := healthy.Start()
	defer hs.Close()

	hungName := func(i int) string { return fmt.Sprintf("tenants/t%d/connections/erp", i) }
	for i := range onHung {
		c := e.conn()
		c.Name = hungName(i)
		if _, err := e.b.CreateConnection(context.Background(), c, false); err != nil {
			t.Fatal(err)
		}
	}
	other := e.conn()
	other.Name, other.InstanceURL = "tenants/other/connections/erp", hs.URL
	if _, err := e.b.CreateConnection(context.Background(), other, false); err != nil {
		t.Fatal(err)
	}
	e.clock.Advance(2 * time.Hour) // every access token has expired

	// The first server holds every token request until released.
	arrived, release := make(chan struct{}, onHung), make(chan struct{})
	for range onHung {
		e.idp.Inject(acumaticatest.Fault{Arrived: arrived, Release: release})
	}
	errs := make(chan error, onHung)
	for i := range onHung {
		go func() {
			ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
			defer cancel()
			_, err := e.b.GetAccessToken(ctx, hungName(i), time.Minute, "")
			errs <- err
		}()
	}
	for range perHost {
		<-arrived
	}
	// The hung server now holds its share of the cap, and more of its
	// refreshes queue behind it; the other server's connection refreshes.
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	tok, err := e.b.GetAccessToken(ctx, other.Name, time.Minute, "")
	cancel()
	if err != nil || !healthy.AccessTokenValid(tok.AccessToken) {
		t.Errorf("connection on the healthy server while the other hangs: err = %v, want a live token", err)
	}
	close(release)
	for range onHung {
		if err := <-errs; err != nil {
			t.Errorf("connection on the released server: %v", err)
		}
	}
	c := e.idp.Counts()
	if c.RefreshGrants != onHung || c.MaxConcurrentUser != perHost {
		t.Errorf("hung server saw %d refresh grants, at most %d at once; want %d, at most %d",
			c.RefreshGrants, c.MaxConcurrentUser, onHung, perHost)
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
	// A valid token exists: the caller gets it although upstream hangs.
	tok, err := e.token(15 * time.Minute)
	if err != nil || tok.AccessToken != first.AccessToken {
		t.Fatalf("err = %v, want the cached token", err)
	}
	if v := e.view(); v.State != broker.StateDegraded {
		t.Errorf("state = %s, want DEGRADED", v.State)
	}
	// A hang after the request was sent is ambiguous: the next attempt uses the
	// same refresh token, which upstream never processed, so it still works.
	e.clock.Advance(time.Hour)
	if _, err := e.token(time.Minute); err != nil {
		t.Fatalf("after the hang: %v", err)
	}
	if c := e.idp.Counts(); c.PasswordGrants != 1 || c.InvalidGrant != 0 {
		t.Errorf("counts = %+v", c)
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

func TestRejectedReportsCannotStormUpstream(t *testing.T) {
	e := newEnv(t)
	e.create()
	t1 := e.mustToken()
	ctx := context.Background()
	t2, err := e.b.GetAccessToken(ctx, connName, time.Minute, t1.AccessToken)
	if err != nil || t2.AccessToken == t1.AccessToken {
		t.Fatalf("first report: %v", err)
	}
	// The fresh token is reported at once: no second refresh within the cooldown.
	_, err = e.b.GetAccessToken(ctx, connName, time.Minute, t2.AccessToken)
	var be *broker.Error
	if !errors.As(err, &be) || be.Reason != broker.ReasonRejectedTooOften || be.RetryAfter <= 0 || be.RetryAfter > 5*time.Second {
		t.Fatalf("second report: %v, want TOKEN_REJECTED_TOO_OFTEN with a retry delay", err)
	}
	if got := e.idp.Counts().RefreshGrants; got != 1 {
		t.Errorf("refresh grants = %d, want 1", got)
	}
	// Other callers still get the token meanwhile.
	if tok := e.mustToken(); tok.AccessToken != t2.AccessToken {
		t.Error("normal caller did not get the current token")
	}
	// After the cooldown a report refreshes again.
	e.clock.Advance(6 * time.Second)
	t3, err := e.b.GetAccessToken(ctx, connName, time.Minute, t2.AccessToken)
	if err != nil || t3.AccessToken == t2.AccessToken {
		t.Fatalf("after cooldown: %v", err)
	}
	if got := e.idp.Counts().RefreshGrants; got != 2 {
		t.Errorf("refresh grants = %d, want 2", got)
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

// slowLoadStore lets a test hold LoadAll back until it says so.
type slowLoadStore struct {
	broker.Store
	release chan struct{}
}

func (s *slowLoadStore) LoadAll(ctx context.Context, fn func(*storage.Connection, *storage.Tokens) error) error {
	<-s.release
	return s.Store.LoadAll(ctx, fn)
}

func TestServesWhileLoading(t *testing.T) {
	e := newEnv(t)
	names := []string{"tenants/a/connections/one", "tenants/a/connections/two", "tenants/a/connections/three"}
	for _, n := range names {
		c := e.conn()
		c.Name = n
		if _, err := e.b.CreateConnection(context.Background(), c, false); err != nil {
			t.Fatal(err)
		}
	}
	want, _ := e.b.GetAccessToken(context.Background(), names[0], time.Minute, "")
	e.b.Close()
	slow := &slowLoadStore{Store: e.fs, release: make(chan struct{})}
	o := e.opts
	o.Store = slow
	b, err := broker.New(o)
	if err != nil {
		t.Fatal(err)
	}
	defer b.Close()
	loaded := make(chan error, 1)
	go func() { _, err := b.Load(context.Background()); loaded <- err }()

	before := e.idp.Counts()
	// Before the bulk load has read anything, a token is served from the store.
	got, err := b.GetAccessToken(context.Background(), names[0], time.Minute, "")
	if err != nil || got.AccessToken != want.AccessToken {
		t.Fatalf("token while loading: %v", err)
	}
	// A delete while loading stays deleted; a create while loading stays created.
	if err := b.DeleteConnection(context.Background(), names[1], ""); err != nil {
		t.Fatal(err)
	}
	nc := e.conn()
	nc.Name = "tenants/a/connections/four"
	if _, err := b.CreateConnection(context.Background(), nc, false); err != nil {
		t.Fatal(err)
	}
	// Creating one that exists but is not loaded yet is refused without a sign-in.
	dup := e.conn()
	dup.Name = names[2]
	pw := e.idp.Counts().PasswordGrants
	if _, err := b.CreateConnection(context.Background(), dup, false); !errors.Is(err, broker.ErrAlreadyExists) {
		t.Errorf("duplicate while loading: %v", err)
	}
	if e.idp.Counts().PasswordGrants != pw {
		t.Error("duplicate create signed in")
	}
	close(slow.release)
	if err := <-loaded; err != nil {
		t.Fatal(err)
	}
	if _, err := b.GetConnection(context.Background(), names[1]); !errors.Is(err, broker.ErrNotFound) {
		t.Errorf("deleted connection came back after the load: %v", err)
	}
	for _, n := range []string{names[0], names[2], "tenants/a/connections/four"} {
		if _, err := b.GetConnection(context.Background(), n); err != nil {
			t.Errorf("%s after the load: %v", n, err)
		}
	}
	if got := e.idp.Counts(); got.RefreshGrants != before.RefreshGrants {
		t.Errorf("loading called upstream: %+v", got)
	}
}
