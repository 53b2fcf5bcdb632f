package broker_test

import (
	"context"
	"errors"
	"fmt"
	"net/http"
	"net/http/httptest"
	"slices"
	"strings"
	"sync"
	"testing"
	"time"

	"tokenbroker/broker"
	"tokenbroker/broker/acumaticatest"
)

// Tests of token lifetimes: short-lived tokens, a missing expires_in, and
// requests that no token of the connection's lifetime can meet.

func shortTokens(d time.Duration) envOption {
	return func(o *acumaticatest.Options, _ *broker.Options) { o.AccessTokenLifetime = d }
}

// TestShortLivedTokensAreServedAndRenewed: an identity server may issue
// tokens that live a few seconds (RFC 6749 allows any positive lifetime).
// They are accepted on create, served honouring min_valid_for, renewed when
// they lapse, and renewed ahead at 75% of their life while in use.
func TestShortLivedTokensAreServedAndRenewed(t *testing.T) {
	for secs := 1; secs <= 9; secs++ {
		life := time.Duration(secs) * time.Second
		t.Run(life.String(), func(t *testing.T) {
			e := newEnv(t, shortTokens(life))
			e.create()
			tok, err := e.token(life / 2)
			if err != nil {
				t.Fatalf("GetAccessToken(min %v): %v", life/2, err)
			}
			if got, want := tok.ExpireTime, e.clock.Now().Add(life); !got.Equal(want) || !e.idp.AccessTokenValid(tok.AccessToken) {
				t.Fatalf("expire time %v (want %v), live %v", got, want, e.idp.AccessTokenValid(tok.AccessToken))
			}

			// Lapsed: the next caller gets a new token from one refresh.
			e.clock.Advance(life + time.Millisecond)
			next, err := e.token(0)
			if err != nil || next.AccessToken == tok.AccessToken || !e.idp.AccessTokenValid(next.AccessToken) {
				t.Fatalf("after expiry: err %v, same token %v", err, next.AccessToken == tok.AccessToken)
			}
			if c := e.idp.Counts(); c.RefreshGrants != 1 || c.PasswordGrants != 1 {
				t.Errorf("counts = %+v, want one refresh", c)
			}

			// In use and past 75% of its life: maintenance renews it ahead.
			e.clock.Advance(life / 2)
			if _, err := e.token(0); err != nil {
				t.Fatal(err)
			}
			e.clock.Advance(life / 4)
			e.b.Maintain()
			e.settle()
			if c := e.idp.Counts(); c.RefreshGrants != 2 {
				t.Errorf("refresh grants = %d, want 2: a token in use is renewed at 75%% of its life", c.RefreshGrants)
			}
		})
	}
}

// TestShortLivedTokensThroughTheControlAPI switches a running stand-in to
// 3-second tokens through its control API, as an operator's test setup
// would, and the broker follows.
func TestShortLivedTokensThroughTheControlAPI(t *testing.T) {
	e := newEnv(t)
	e.create()
	ctl := httptest.NewServer(e.idp.ControlHandler())
	defer ctl.Close()
	resp, err := http.Post(ctl.URL+"/_control/access-token-lifetime", "application/json", strings.NewReader(`{"seconds":3}`))
	if err != nil {
		t.Fatal(err)
	}
	resp.Body.Close()
	if resp.StatusCode != http.StatusNoContent {
		t.Fatalf("control API: HTTP %d", resp.StatusCode)
	}
	e.clock.Advance(2 * time.Hour)
	tok, err := e.token(2 * time.Second)
	if err != nil {
		t.Fatalf("GetAccessToken: %v", err)
	}
	if left := tok.ExpireTime.Sub(e.clock.Now()); left != 3*time.Second {
		t.Errorf("token valid for %v, want 3s", left)
	}
}

// TestMissingExpiresInMeansOneHour: RFC 6749 makes expires_in only
// RECOMMENDED. A 200 without it carries a rotated refresh token; refusing
// it would lose the chain. The documented default (one hour) applies.
func TestMissingExpiresInMeansOneHour(t *testing.T) {
	e := newEnv(t, func(_ *acumaticatest.Options, b *broker.Options) { b.MaxAttempts = 1 })
	e.create()
	e.clock.Advance(2 * time.Hour)
	e.idp.Inject(acumaticatest.Fault{Mutate: func(m map[string]any) { delete(m, "expires_in") }})
	tok, err := e.token(time.Minute)
	if err != nil {
		t.Fatalf("GetAccessToken: %v", err)
	}
	if left := tok.ExpireTime.Sub(e.clock.Now()); left != time.Hour {
		t.Errorf("token valid for %v, want the 1h default", left)
	}
	if c := e.idp.Counts(); c.RefreshGrants != 1 || !e.idp.AccessTokenValid(tok.AccessToken) {
		t.Errorf("counts = %+v: the answer without expires_in must serve as is", c)
	}
}

// TestMinValidForAboveTheLifetimeCausesNoRefreshStorm: a min_valid_for above
// half the token lifetime is answered TOKEN_LIFETIME_TOO_SHORT from what the
// broker holds, with one refresh once the held token has expired; any other
// is served, and every refresh it triggers comes at a token age of at least
// half the lifetime. So no token causes more than one refresh, however many
// callers ask, one call a second for a simulated hour.
func TestMinValidForAboveTheLifetimeCausesNoRefreshStorm(t *testing.T) {
	for _, tc := range []struct {
		life, minValid time.Duration
		tooShort       bool
	}{
		{50 * time.Second, 60 * time.Second, true},
		{50 * time.Second, 50 * time.Second, true},
		{60 * time.Second, 300 * time.Second, true},
		{15 * time.Minute, 30 * time.Minute, true},
		{15 * time.Minute, 14*time.Minute + 58*time.Second, true},
		{15 * time.Minute, 7*time.Minute + 31*time.Second, true},
		{15 * time.Minute, 7*time.Minute + 30*time.Second, false},
		{50 * time.Second, 25 * time.Second, false},
	} {
		t.Run(fmt.Sprintf("%v tokens, min %v", tc.life, tc.minValid), func(t *testing.T) {
			e := newEnv(t, shortTokens(tc.life))
			e.create()
			const elapsed, step, callers = time.Hour, time.Second, 2
			var (
				wg       sync.WaitGroup
				mu       sync.Mutex
				bad      []error
				tooShort int
				issued   = map[time.Time]bool{} // expire times of the tokens served
			)
			for range elapsed / step {
				e.clock.Advance(step)
				for range callers {
					wg.Go(func() {
						now := e.clock.Now()
						tok, err := e.token(tc.minValid)
						mu.Lock()
						defer mu.Unlock()
						switch {
						case errors.Is(err, broker.ErrTokenTooShort):
							tooShort++
						case err != nil:
							bad = append(bad, err)
						case tok.ExpireTime.Sub(now) < tc.minValid:
							bad = append(bad, fmt.Errorf("served a token valid for %v", tok.ExpireTime.Sub(now)))
						default:
							issued[tok.ExpireTime] = true
						}
					})
				}
				wg.Wait()
			}
			if len(bad) > 0 {
				t.Errorf("%d answers were neither ErrTokenTooShort nor a token meeting the request, e.g. %v", len(bad), bad[0])
			}
			if got := tooShort > 0; got != tc.tooShort {
				t.Errorf("%d answers TOKEN_LIFETIME_TOO_SHORT; want some: %v", tooShort, tc.tooShort)
			}
			refreshes := e.idp.Counts().RefreshGrants + e.idp.Counts().PasswordGrants - 1
			most := int(elapsed / (tc.life / 2))
			if tc.tooShort {
				most = int(elapsed / tc.life)
			}
			if refreshes > most {
				t.Errorf("%v of calls to %v tokens made %d refreshes, want at most %d", elapsed, tc.life, refreshes, most)
			}
			// Each refresh came when the token it replaced was at least
			// half its lifetime old.
			var times []time.Time
			for exp := range issued {
				times = append(times, exp)
			}
			slices.SortFunc(times, time.Time.Compare)
			for i := 1; i < len(times); i++ {
				if age := times[i].Sub(times[i-1]); age < tc.life/2 {
					t.Fatalf("a token was replaced at age %v, below half its lifetime %v", age, tc.life)
				}
			}
		})
	}
}

// TestDegradedFromTheFirstFailedAttempt: while a shared refresh retries a
// failing upstream, the connection reads DEGRADED with the last error from
// the first failed attempt, callers still get the valid cached token, and
// it reads ACTIVE again after the next success.
func TestDegradedFromTheFirstFailedAttempt(t *testing.T) {
	sleeping := make(chan struct{}, 1)
	resume := make(chan struct{})
	e := newEnv(t, shortTokens(8*time.Second), func(_ *acumaticatest.Options, b *broker.Options) {
		b.Sleep = func(ctx context.Context, _ time.Duration) error {
			select {
			case sleeping <- struct{}{}:
			default:
			}
			select {
			case <-resume:
				return nil
			case <-ctx.Done():
				return ctx.Err()
			}
		}
	})
	e.create()
	cached, err := e.token(time.Second)
	if err != nil {
		t.Fatal(err)
	}
	e.clock.Advance(5 * time.Second) // 3 s left
	e.idp.Inject(acumaticatest.Fault{Status: http.StatusServiceUnavailable})
	type answer struct {
		tok broker.Token
		err error
	}
	done := make(chan answer, 1)
	go func() {
		tok, err := e.token(4 * time.Second) // half the lifetime: more than is left
		done <- answer{tok, err}
	}()
	<-sleeping // the first attempt failed; the refresh waits to retry

	v := e.view()
	if v.State != broker.StateDegraded || v.Status.LastErrorCode != broker.ReasonUpstreamUnavailable || !strings.Contains(v.Status.LastErrorMessage, "503") {
		t.Errorf("during the retry: state %s, last error %s %q; want DEGRADED with the 503", v.State, v.Status.LastErrorCode, v.Status.LastErrorMessage)
	}
	if tok, err := e.token(time.Second); err != nil || tok.AccessToken != cached.AccessToken {
		t.Errorf("during the retry: err %v, cached token served %v", err, err == nil && tok.AccessToken == cached.AccessToken)
	}

	close(resume)
	a := <-done
	if a.err != nil || a.tok.AccessToken == cached.AccessToken || !e.idp.AccessTokenValid(a.tok.AccessToken) {
		t.Fatalf("after the retry: err %v", a.err)
	}
	if v := e.view(); v.State != broker.StateActive || v.Status.StateReason != "" {
		t.Errorf("after the success: state %s (%s), want ACTIVE", v.State, v.Status.StateReason)
	}
}

// TestDegradedIsNeverStored: DEGRADED is what this process sees of the
// upstream now; no record written to the store carries it, so a restart
// never shows a failure that may be long gone.
func TestDegradedIsNeverStored(t *testing.T) {
	e := newEnv(t, func(_ *acumaticatest.Options, b *broker.Options) { b.MaxAttempts = 1 })
	e.create()
	e.clock.Advance(2 * time.Hour)
	for i := range 3 {
		e.idp.Inject(acumaticatest.Fault{Status: http.StatusBadGateway})
		if _, err := e.token(time.Minute); !errors.Is(err, broker.ErrUpstreamUnavailable) {
			t.Fatalf("attempt %d: err = %v, want ErrUpstreamUnavailable", i, err)
		}
		if v := e.view(); v.State != broker.StateDegraded {
			t.Fatalf("attempt %d: state %s, want DEGRADED", i, v.State)
		}
		// The next attempt records its intent: from the committed record.
		if st := e.stored(); st.State == string(broker.StateDegraded) || st.LastErrorCode == broker.ReasonUpstreamUnavailable {
			t.Fatalf("attempt %d: stored state %q, last error %q: runtime state was persisted", i, st.State, st.LastErrorCode)
		}
		e.clock.Advance(time.Second)
	}
	e.restart()
	if v := e.view(); v.State != broker.StateActive {
		t.Errorf("after restart: state %s, want ACTIVE", v.State)
	}
}
