package broker

import (
	"errors"
	"fmt"
	"net/http"
	"strings"
	"testing"
	"time"

	"tokenbroker/storage"
)

// The broker's pure decisions, as tables: what an upstream failure means,
// what maintenance renews, how long backoff waits, which lifetimes are
// accepted.

func TestClassifyStatus(t *testing.T) {
	const refresh, password = grantRefresh, grantPassword
	for _, tc := range []struct {
		status     int
		body       string
		grant      string
		wantClass  failureClass
		wantReason string
		wantKind   error
	}{
		{400, `{"error":"invalid_grant"}`, refresh, classInvalidGrant, ReasonRefreshTokenRevoked, ErrUpstreamUnavailable},
		{400, `{"error":"invalid_grant","error_description":"invalid_username_or_password"}`, password, classInvalidGrant, ReasonCredentialsRejected, ErrCredentialsRejected},
		{400, `{"error":"invalid_client"}`, refresh, classInvalidClient, ReasonClientRejected, ErrCredentialsRejected},
		{400, `{"error":"invalid_client"}`, password, classInvalidClient, ReasonClientRejected, ErrCredentialsRejected},
		{401, ``, refresh, classInvalidClient, ReasonClientRejected, ErrCredentialsRejected},
		{400, `{"error":"unauthorized_client"}`, password, classInvalidClient, ReasonClientRejected, ErrCredentialsRejected},
		{400, `{"error":"unsupported_grant_type"}`, refresh, classInvalidClient, ReasonClientRejected, ErrCredentialsRejected},
		{400, `{"error":"invalid_scope"}`, password, classInvalidClient, ReasonClientRejected, ErrCredentialsRejected},
		{400, `{"error":"invalid_request"}`, refresh, classAmbiguous, ReasonUpstreamUnavailable, ErrUpstreamUnavailable},
		{400, `<html>bad request</html>`, refresh, classAmbiguous, ReasonUpstreamUnavailable, ErrUpstreamUnavailable},
		// 429 is a rate limit on a refresh, a sign-in limit on a password
		// grant (which opens a session), whatever the body says.
		{429, ``, refresh, classSafe, ReasonUpstreamRateLimited, ErrUpstreamUnavailable},
		{429, ``, password, classLoginLimit, ReasonLoginLimit, ErrLoginLimit},
		{429, `{"error":"invalid_grant"}`, password, classLoginLimit, ReasonLoginLimit, ErrLoginLimit},
		{400, `{"error":"invalid_grant","error_description":"API Login Limit"}`, refresh, classLoginLimit, ReasonLoginLimit, ErrLoginLimit},
		{500, `API login limit reached`, password, classLoginLimit, ReasonLoginLimit, ErrLoginLimit},
		{503, ``, refresh, classSafe, ReasonUpstreamUnavailable, ErrUpstreamUnavailable},
		{500, ``, refresh, classAmbiguous, ReasonUpstreamUnavailable, ErrUpstreamUnavailable},
		{502, ``, refresh, classAmbiguous, ReasonUpstreamUnavailable, ErrUpstreamUnavailable},
		{504, `{"error":"invalid_grant"}`, password, classInvalidGrant, ReasonCredentialsRejected, ErrCredentialsRejected},
		{307, ``, refresh, classSafe, ReasonUpstreamUnavailable, ErrUpstreamUnavailable},
	} {
		t.Run(fmt.Sprintf("%d %s %s", tc.status, tc.grant, tc.body), func(t *testing.T) {
			resp := &http.Response{StatusCode: tc.status, Header: http.Header{"Content-Type": {"application/json"}}}
			if strings.HasPrefix(tc.body, "<") {
				resp.Header.Set("Content-Type", "text/html")
			}
			e := classifyStatus(resp, []byte(tc.body), tc.grant, nil)
			if e.class != tc.wantClass || e.reason() != tc.wantReason {
				t.Errorf("class %v reason %s, want %v %s", e.class, e.reason(), tc.wantClass, tc.wantReason)
			}
			if err := e.toError("tenants/t/connections/c", time.Second); !errors.Is(err, tc.wantKind) || err.Reason != tc.wantReason {
				t.Errorf("error %v (reason %s), want kind %v", err, err.Reason, tc.wantKind)
			}
		})
	}
}

func TestClassifyTransport(t *testing.T) {
	for _, tc := range []struct {
		name string
		err  error
		sent bool
		want failureClass
	}{
		{"not sent", errors.New("dial tcp: lookup erp.example.com: no such host"), false, classSafe},
		{"timeout after send", fmt.Errorf("read: %w", errTimeout{}), true, classAmbiguous},
		{"reset after send", errors.New("read: connection reset by peer"), true, classAmbiguous},
	} {
		t.Run(tc.name, func(t *testing.T) {
			if got := classifyTransport(tc.err, tc.sent).class; got != tc.want {
				t.Errorf("class %v, want %v", got, tc.want)
			}
		})
	}
}

type errTimeout struct{}

func (errTimeout) Error() string   { return "i/o timeout" }
func (errTimeout) Timeout() bool   { return true }
func (errTimeout) Temporary() bool { return true }

func TestDue(t *testing.T) {
	now := time.Date(2026, 11, 24, 9, 0, 0, 0, time.UTC)
	b, err := New(Options{Store: struct{ Store }{}, Now: func() time.Time { return now }, TickInterval: -1})
	if err != nil {
		t.Fatal(err)
	}
	issued := now.Add(-50 * time.Minute) // of a 1-hour token: past 75%
	fresh := func() *storage.Tokens {
		return &storage.Tokens{AccessToken: "at", RefreshToken: "rt", IssueTime: issued, AccessTokenExpireTime: issued.Add(time.Hour),
			RefreshTokenUseTime: issued, ChainStartTime: issued}
	}
	for _, tc := range []struct {
		name     string
		lastUsed time.Time
		absolute time.Duration
		set      func(*conn)
		want     trigger
	}{
		{"in use past 75%", now.Add(-time.Minute), 0, nil, triggerProactive},
		{"idle past 75%", issued.Add(-time.Minute), 0, nil, 0},
		{"in use before 75%", now, 0, func(c *conn) { c.committed.IssueTime = now.Add(-10 * time.Minute) }, 0},
		{"a refresh in flight", now, 0, func(c *conn) { c.flight = &flight{} }, 0},
		{"deleted", now, 0, func(c *conn) { c.deleted = true }, 0},
		{"backing off", now, 0, func(c *conn) { c.rt.backoffUntil = now.Add(time.Second) }, 0},
		{"a commit to retry", now, 0, func(c *conn) { c.rt.pending = fresh() }, triggerCommit},
		{"a commit to retry, backing off", now, 0, func(c *conn) { c.rt.pending, c.rt.backoffUntil = fresh(), now.Add(time.Second) }, 0},
		{"halted", now, 0, func(c *conn) { c.committed.State = string(StateNeedsReauth) }, 0},
		{"recovering after a crash", now, 0, func(c *conn) { c.rt.recovering = true }, triggerRecover},
		{"idle refresh token past keep-alive", issued.Add(-time.Minute), 0,
			func(c *conn) { c.committed.RefreshTokenUseTime = now.Add(-8 * 24 * time.Hour) }, triggerKeepAlive},
		// Absolute 10 days: the margin is a quarter (2.5 days), forced at
		// four fifths of it (2 days).
		{"chain before its margin, quiet", now.Add(-time.Hour), 10 * 24 * time.Hour,
			func(c *conn) {
				c.committed.ChainStartTime = now.Add(-7*24*time.Hour - 11*time.Hour)
				c.committed.IssueTime = now
			}, 0},
		{"chain in its margin, quiet", now.Add(-time.Hour), 10 * 24 * time.Hour,
			func(c *conn) {
				c.committed.ChainStartTime = now.Add(-7*24*time.Hour - 13*time.Hour)
				c.committed.IssueTime = now
			}, triggerRenewChain},
		{"chain in its margin, busy", now, 10 * 24 * time.Hour,
			func(c *conn) {
				c.committed.ChainStartTime = now.Add(-7*24*time.Hour - 13*time.Hour)
				c.committed.IssueTime = now
			}, 0},
		{"chain past four fifths of its margin, busy", now, 10 * 24 * time.Hour,
			func(c *conn) {
				c.committed.ChainStartTime = now.Add(-8*24*time.Hour - time.Minute)
				c.committed.IssueTime = now
			}, triggerRenewChain},
		// Absolute 30 days: the margin is capped at 5 days, forced at 4,
		// before the 3 days at which the lapse alert fires.
		{"30-day chain 5 days before its end, quiet", now.Add(-time.Hour), 30 * 24 * time.Hour,
			func(c *conn) {
				c.committed.ChainStartTime = now.Add(-25*24*time.Hour - time.Minute)
				c.committed.IssueTime = now
			}, triggerRenewChain},
		{"30-day chain 4 days before its end, busy", now, 30 * 24 * time.Hour,
			func(c *conn) {
				c.committed.ChainStartTime = now.Add(-26*24*time.Hour - time.Minute)
				c.committed.IssueTime = now
			}, triggerRenewChain},
		{"30-day chain a little over 4 days before its end, busy", now, 30 * 24 * time.Hour,
			func(c *conn) {
				c.committed.ChainStartTime = now.Add(-26*24*time.Hour + time.Hour)
				c.committed.IssueTime = now
			}, 0},
	} {
		t.Run(tc.name, func(t *testing.T) {
			c := newConn(&storage.Connection{Name: "tenants/t/connections/c", AbsoluteLifetime: tc.absolute}, fresh())
			c.lastUsed.Store(tc.lastUsed.UnixNano())
			if tc.set != nil {
				tc.set(c)
			}
			if got := b.dueLocked(c, now); got != tc.want {
				t.Errorf("due = %v, want %v", got, tc.want)
			}
		})
	}
}

func TestJitterStaysWithinItsBounds(t *testing.T) {
	for _, tc := range []struct {
		base, ceiling time.Duration
		n             int
		want          time.Duration // the full wait before jitter
	}{
		{time.Second, 5 * time.Minute, 1, time.Second},
		{time.Second, 5 * time.Minute, 2, 2 * time.Second},
		{time.Second, 5 * time.Minute, 4, 8 * time.Second},
		{time.Second, 5 * time.Minute, 20, 5 * time.Minute},
		{time.Second, 5 * time.Minute, 1 << 20, 5 * time.Minute},
		{time.Minute, 30 * time.Minute, 3, 4 * time.Minute},
		{time.Millisecond, 10 * time.Millisecond, 10, 10 * time.Millisecond},
	} {
		t.Run(fmt.Sprintf("%v..%v attempt %d", tc.base, tc.ceiling, tc.n), func(t *testing.T) {
			lo, hi := tc.want, time.Duration(0)
			for range 2000 {
				d := jitter(tc.base, tc.ceiling, tc.n)
				lo, hi = min(lo, d), max(hi, d)
			}
			if lo < tc.want/2 || hi > tc.want {
				t.Errorf("waits in [%v, %v], want within [%v, %v]", lo, hi, tc.want/2, tc.want)
			}
			if hi-lo < tc.want/4 {
				t.Errorf("waits in [%v, %v]: no jitter to spread callers", lo, hi)
			}
		})
	}
}

func TestParseExpiresIn(t *testing.T) {
	for _, tc := range []struct {
		raw  string
		want int64
		ok   bool
	}{
		{`1`, 1, true},
		{`9`, 9, true},
		{`"9"`, 9, true},
		{`3600`, 3600, true},
		{`604800`, 604800, true},
		{``, defaultExpiresIn, true},
		{`null`, defaultExpiresIn, true},
		{`0`, 0, false},
		{`-5`, 0, false},
		{`2.5`, 0, false},
		{`"soon"`, 0, false},
		{`""`, 0, false},
		{`604801`, 0, false},
		{`1e12`, 0, false},
		{`NaN`, 0, false},
	} {
		got, ok := parseExpiresIn([]byte(tc.raw))
		if got != tc.want || ok != tc.ok {
			t.Errorf("parseExpiresIn(%s) = %d, %v; want %d, %v", tc.raw, got, ok, tc.want, tc.ok)
		}
	}
}
