package acumaticatest_test

import (
	"crypto/sha256"
	"encoding/base64"
	"encoding/json"
	"net/http"
	"net/url"
	"strings"
	"testing"
	"time"

	"tokenbroker/broker/acumaticatest"
	"tokenbroker/internal/testkit"
)

const (
	acClient   = "5B3F0E3A-1111-2222-3333-444455556666@MyTenant"
	acSecret   = "ac-secret"
	acRedirect = "http://127.0.0.1:8765/callback"
	verifier   = "dBjftJeZ4CVP-mB92K27uhbUJU1p1r_wW1gFWFOEjXk-abcdefgh"
)

func challenge(v string) string {
	sum := sha256.Sum256([]byte(v))
	return base64.RawURLEncoding.EncodeToString(sum[:])
}

// authorizeURL is a valid authorization request, changed by edit.
func authorizeURL(base string, edit func(url.Values)) string {
	q := url.Values{
		"response_type": {"code"}, "client_id": {acClient}, "redirect_uri": {acRedirect},
		"scope": {"api offline_access"}, "state": {"st-1"},
		"code_challenge": {challenge(verifier)}, "code_challenge_method": {"S256"},
	}
	if edit != nil {
		edit(q)
	}
	return base + "/identity/connect/authorize?" + q.Encode()
}

var noFollow = &http.Client{CheckRedirect: func(*http.Request, []*http.Request) error { return http.ErrUseLastResponse }}

// authorize follows the authorization URL and returns the status and the
// redirect's query.
func authorize(t *testing.T, u string) (int, url.Values) {
	t.Helper()
	resp, err := noFollow.Get(u)
	if err != nil {
		t.Fatal(err)
	}
	resp.Body.Close()
	if resp.StatusCode != http.StatusFound {
		return resp.StatusCode, nil
	}
	loc, err := url.Parse(resp.Header.Get("Location"))
	if err != nil {
		t.Fatal(err)
	}
	if got := loc.Scheme + "://" + loc.Host + loc.Path; got != acRedirect {
		t.Fatalf("redirected to %s, want %s", got, acRedirect)
	}
	return resp.StatusCode, loc.Query()
}

func exchange(t *testing.T, base string, form url.Values) (int, map[string]any) {
	t.Helper()
	form.Set("grant_type", "authorization_code")
	form.Set("client_id", acClient)
	form.Set("client_secret", acSecret)
	resp, err := http.PostForm(base+"/identity/connect/token", form)
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	var body map[string]any
	json.NewDecoder(resp.Body).Decode(&body)
	return resp.StatusCode, body
}

func newAuthServer(t *testing.T, clock *testkit.Clock) (*acumaticatest.Server, string) {
	srv := acumaticatest.New(acumaticatest.Options{Now: clock.Now})
	srv.AddAuthCodeClient(acClient, acSecret, acRedirect)
	srv.AddUser("integration", "pw")
	srv.SetConsentUser("integration")
	hs := srv.Start()
	t.Cleanup(hs.Close)
	return srv, hs.URL
}

func TestAuthorizationCodeCycle(t *testing.T) {
	clock := testkit.NewClock()
	srv, base := newAuthServer(t, clock)
	status, q := authorize(t, authorizeURL(base, nil))
	if status != http.StatusFound || q.Get("code") == "" || q.Get("state") != "st-1" {
		t.Fatalf("authorize: %d %v, want 302 with code and state st-1", status, q)
	}
	st, body := exchange(t, base, url.Values{"code": {q.Get("code")}, "redirect_uri": {acRedirect}, "code_verifier": {verifier}})
	if st != 200 || body["refresh_token"] == nil || body["access_token"] == nil {
		t.Fatalf("exchange: %d %v", st, body)
	}
	resp, err := http.PostForm(base+"/identity/connect/token", url.Values{
		"grant_type": {"refresh_token"}, "client_id": {acClient}, "client_secret": {acSecret},
		"refresh_token": {body["refresh_token"].(string)},
	})
	if err != nil {
		t.Fatal(err)
	}
	resp.Body.Close()
	if resp.StatusCode != 200 {
		t.Fatalf("refresh after exchange: %d", resp.StatusCode)
	}
	resp, err = http.PostForm(base+"/identity/connect/token", url.Values{
		"grant_type": {"password"}, "client_id": {acClient}, "client_secret": {acSecret},
		"username": {"integration"}, "password": {"pw"}, "scope": {"api offline_access"},
	})
	if err != nil {
		t.Fatal(err)
	}
	resp.Body.Close()
	if resp.StatusCode != 400 {
		t.Fatalf("password grant on an authorization-code client: %d, want 400", resp.StatusCode)
	}
	if c := srv.Counts(); c.CodeGrants != 1 || c.RefreshGrants != 1 {
		t.Fatalf("counts %+v", c)
	}
}

func TestAuthorizeRefusals(t *testing.T) {
	clock := testkit.NewClock()
	srv, base := newAuthServer(t, clock)
	tests := []struct {
		name       string
		edit       func(url.Values)
		wantStatus int
		wantError  string
	}{
		{"redirect URI not registered exactly", func(q url.Values) { q.Set("redirect_uri", acRedirect+"/") }, 400, ""},
		{"unknown client", func(q url.Values) { q.Set("client_id", "x@T") }, 400, ""},
		{"no PKCE", func(q url.Values) { q.Del("code_challenge") }, 302, "invalid_request"},
		{"plain PKCE", func(q url.Values) { q.Set("code_challenge_method", "plain") }, 302, "invalid_request"},
		{"implicit", func(q url.Values) { q.Set("response_type", "token") }, 302, "unsupported_response_type"},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			status, q := authorize(t, authorizeURL(base, tc.edit))
			if status != tc.wantStatus || q.Get("error") != tc.wantError || q.Get("code") != "" {
				t.Fatalf("got %d %v, want %d error %q and no code", status, q, tc.wantStatus, tc.wantError)
			}
		})
	}
	srv.SetConsentUser("")
	if _, q := authorize(t, authorizeURL(base, nil)); q.Get("error") != "access_denied" {
		t.Fatalf("no consent user: %v, want access_denied", q)
	}
}

func TestCodeExchangeRefusals(t *testing.T) {
	clock := testkit.NewClock()
	srv, base := newAuthServer(t, clock)
	code := func() string {
		_, q := authorize(t, authorizeURL(base, nil))
		return q.Get("code")
	}
	good := func(c string) url.Values {
		return url.Values{"code": {c}, "redirect_uri": {acRedirect}, "code_verifier": {verifier}}
	}
	t.Run("PKCE mismatch", func(t *testing.T) {
		f := good(code())
		f.Set("code_verifier", strings.Repeat("a", 43))
		if st, _ := exchange(t, base, f); st != 400 {
			t.Fatalf("got %d, want 400", st)
		}
	})
	t.Run("wrong redirect URI", func(t *testing.T) {
		f := good(code())
		f.Set("redirect_uri", "http://127.0.0.1:8765/other")
		if st, _ := exchange(t, base, f); st != 400 {
			t.Fatalf("got %d, want 400", st)
		}
	})
	t.Run("expired", func(t *testing.T) {
		c := code()
		clock.Advance(2 * time.Minute)
		if st, _ := exchange(t, base, good(c)); st != 400 {
			t.Fatalf("got %d, want 400", st)
		}
	})
	t.Run("reused code revokes the first exchange's chain", func(t *testing.T) {
		c := code()
		st, body := exchange(t, base, good(c))
		if st != 200 {
			t.Fatalf("first exchange: %d", st)
		}
		if st, _ := exchange(t, base, good(c)); st != 400 {
			t.Fatalf("replay: %d, want 400", st)
		}
		if srv.AccessTokenValid(body["access_token"].(string)) {
			t.Fatal("the first exchange's access token survived a replayed code")
		}
		if srv.Counts().CodeReuse != 1 {
			t.Fatalf("code reuse not counted: %+v", srv.Counts())
		}
	})
}
