package broker

import (
	"strings"
	"testing"
	"time"
)

func FuzzParseTokenResponse(f *testing.F) {
	for _, s := range []string{
		`{"access_token":"a","token_type":"Bearer","expires_in":3600,"refresh_token":"r","scope":"api offline_access"}`,
		`{"access_token":"a","token_type":"Bearer","expires_in":"3600"}`,
		`{"token_type":"Bearer","expires_in":3600,"refresh_token":"r"}`,
		`{"access_token":"a","expires_in":-1}`, `{"access_token":"a","expires_in":1e300}`, `[]`, `null`, ``,
	} {
		f.Add([]byte(s))
	}
	f.Fuzz(func(t *testing.T, body []byte) {
		tr, err := parseTokenResponse(body, nil)
		if err != nil {
			return
		}
		if tr.AccessToken == "" || tr.ExpiresIn < time.Second || tr.ExpiresIn > 7*24*time.Hour || !strings.EqualFold(tr.TokenType, "bearer") {
			t.Errorf("accepted unusable answer %q -> %+v", body, tr)
		}
	})
}

func TestScrubRemovesSecrets(t *testing.T) {
	got := scrub("bad secret s3cr3t-value for user\x00\n", 200, []string{"s3cr3t-value"})
	if strings.Contains(got, "s3cr3t") || strings.ContainsAny(got, "\x00\n") {
		t.Errorf("scrub = %q", got)
	}
	if got := scrub(strings.Repeat("x", 500), 10, nil); len(got) > 13 {
		t.Errorf("not truncated: %d", len(got))
	}
}

func TestParseRetryAfter(t *testing.T) {
	now := time.Date(2026, 1, 1, 0, 0, 0, 0, time.UTC)
	for _, tc := range []struct {
		in   string
		want time.Duration
	}{
		{"120", 2 * time.Minute},
		{"", 0},
		{"-5", 0},
		{"999999", time.Hour},
		{"Thu, 01 Jan 2026 00:00:30 GMT", 30 * time.Second},
		{"garbage", 0},
	} {
		if got := parseRetryAfter(tc.in, now); got != tc.want {
			t.Errorf("parseRetryAfter(%q) = %v, want %v", tc.in, got, tc.want)
		}
	}
}
