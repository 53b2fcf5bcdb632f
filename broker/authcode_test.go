package broker_test

import (
	"context"
	"crypto/sha256"
	"encoding/base64"
	"encoding/json"
	"errors"
	"net/http"
	"net/http/httptest"
	"net/url"
	"strings"
	"sync"
	"testing"
	"time"

	clientv3 "go.etcd.io/etcd/client/v3"

	"tokenbroker/broker"
	"tokenbroker/broker/acumaticatest"
	"tokenbroker/internal/testkit"
	"tokenbroker/storage"
	"tokenbroker/storage/etcdtest"
)

const (
	acClientID  = "5B3F0E3A-8D4C-4E1B-9A0F-2C6D7E8F9A1B@MyTenant"
	acRedirect  = "https://app.example.com/acumatica/callback"
	acRedirect2 = "https://app.example.com/acumatica/other"
	acName      = "tenants/acme/connections/destination"
)

// withAuthCode registers an authorization-code client at the stand-in with
// two redirect URIs, and makes the integration user consent.
func (e *env) withAuthCode() *env {
	e.idp.AddAuthCodeClient(acClientID, clientSecret, acRedirect, acRedirect2)
	e.idp.SetConsentUser(username)
	return e
}

// acConn is an authorization-code connection named name.
func (e *env) acConn(name string) *storage.Connection {
	return &storage.Connection{Name: name, InstanceURL: e.http.URL, ClientID: acClientID, ClientSecret: clientSecret,
		Flow: storage.FlowAuthorizationCode, RedirectURI: acRedirect}
}

var noRedirects = &http.Client{CheckRedirect: func(*http.Request, []*http.Request) error { return http.ErrUseLastResponse }}

// follow opens an authorization URL as a browser that is signed in would
// (curl without -L) and returns the query of the redirect.
func follow(t *testing.T, authURL string) url.Values {
	t.Helper()
	resp, err := noRedirects.Get(authURL)
	if err != nil {
		t.Fatal(err)
	}
	resp.Body.Close()
	if resp.StatusCode != http.StatusFound {
		t.Fatalf("authorize answered %d, want 302", resp.StatusCode)
	}
	loc, err := url.Parse(resp.Header.Get("Location"))
	if err != nil {
		t.Fatal(err)
	}
	return loc.Query()
}

// start starts an authorization for a new authorization-code connection.
func (e *env) start(name string) *broker.Authorization {
	e.t.Helper()
	a, err := e.b.StartAuthorization(context.Background(), broker.Target{Conn: e.acConn(name)}, false)
	if err != nil {
		e.t.Fatalf("StartAuthorization: %v", err)
	}
	return a
}

// authorizeNew runs the whole flow for a new connection named name.
func (e *env) authorizeNew(name string) *broker.View {
	e.t.Helper()
	q := follow(e.t, e.start(name).URL)
	v, err := e.b.CompleteAuthorization(context.Background(), name, q.Get("state"), q.Get("code"))
	if err != nil {
		e.t.Fatalf("CompleteAuthorization: %v", err)
	}
	return v
}

func reasonOf(err error) string {
	var be *broker.Error
	if errors.As(err, &be) {
		return be.Reason
	}
	return ""
}

// assertNoSecrets fails if any of what the stand-in issued or was shown
// (tokens, codes, states, verifiers) appears in texts.
func assertNoSecrets(t *testing.T, e *env, texts ...string) {
	t.Helper()
	for _, sec := range e.idp.Issued() {
		for _, s := range texts {
			if strings.Contains(s, sec) {
				t.Fatalf("secret %.8s... found in %q", sec, s)
			}
		}
	}
}

func viewText(v *broker.View) string {
	b, _ := json.Marshal(v)
	return string(b)
}

func TestAuthorizationCodeFullCycle(t *testing.T) {
	e := newEnv(t).withAuthCode()
	a := e.start(acName)
	u, err := url.Parse(a.URL)
	if err != nil {
		t.Fatal(err)
	}
	q := u.Query()
	if u.Path != "/identity/connect/authorize" || q.Get("code_challenge_method") != "S256" || len(q.Get("code_challenge")) != 43 ||
		len(q.Get("state")) < 43 || q.Get("redirect_uri") != acRedirect || q.Get("client_id") != acClientID {
		t.Fatalf("authorization URL %s lacks what RFC 6749 4.1.1 and RFC 7636 ask", u.Redacted())
	}
	if got := a.ExpireTime.Sub(e.clock.Now()); got != 10*time.Minute {
		t.Fatalf("authorization expires in %v, want 10m", got)
	}
	if _, err := e.store.GetConnection(context.Background(), acName); !errors.Is(err, storage.ErrNotFound) {
		t.Fatalf("a started authorization stored something: %v", err)
	}

	redirect := follow(t, a.URL)
	v, err := e.b.CompleteAuthorization(context.Background(), acName, redirect.Get("state"), redirect.Get("code"))
	if err != nil {
		t.Fatalf("CompleteAuthorization: %v", err)
	}
	if v.State != broker.StateActive || v.Conn.Flow != storage.FlowAuthorizationCode || v.PasswordSet || v.Conn.Username != "" || !v.Status.HasRefreshToken {
		t.Fatalf("view after completion: %+v", v)
	}
	stored, err := e.store.GetTokens(context.Background(), acName)
	if err != nil || stored.RefreshToken == "" || stored.IntentGrant != "" || stored.ChainStartTime.IsZero() {
		t.Fatalf("stored chain %+v, %v: want a refresh token, no intent, a chain start", stored, err)
	}
	assertNoSecrets(t, e, viewText(v))

	// Served from memory, then refreshed with the exchanged chain.
	ctx := context.Background()
	tok, err := e.b.GetAccessToken(ctx, acName, time.Minute, "")
	if err != nil || tok.AccessToken != stored.AccessToken {
		t.Fatalf("GetAccessToken after completion: %v", err)
	}
	e.clock.Advance(2 * time.Hour)
	if _, err := e.b.GetAccessToken(ctx, acName, time.Minute, ""); err != nil {
		t.Fatalf("GetAccessToken after expiry: %v", err)
	}
	c := e.idp.Counts()
	if c.CodeGrants != 1 || c.RefreshGrants != 1 || c.PasswordGrants != 0 {
		t.Fatalf("upstream saw %+v; want 1 code grant, 1 refresh grant, no password grant", c)
	}
	// The chain survives a restart.
	e.restart()
	if _, err := e.b.GetAccessToken(ctx, acName, time.Minute, ""); err != nil {
		t.Fatalf("GetAccessToken after restart: %v", err)
	}
}

// TestCompleteAuthorizationRefusals: every refused completion is a clear
// error and stores nothing.
func TestCompleteAuthorizationRefusals(t *testing.T) {
	e := newEnv(t).withAuthCode()
	ctx := context.Background()
	e.authorizeNew("tenants/acme/connections/first")

	tests := []struct {
		name       string
		complete   func() (name, state, code string)
		wantReason string
	}{
		{"PKCE mismatch: another authorization's code", func() (string, string, string) {
			a, b := follow(t, e.start(acName).URL), follow(t, e.start("tenants/acme/connections/other").URL)
			return acName, a.Get("state"), b.Get("code")
		}, broker.ReasonCodeRejected},
		{"reused code", func() (string, string, string) {
			q := follow(t, e.start("tenants/acme/connections/used").URL)
			if _, err := e.b.CompleteAuthorization(ctx, "tenants/acme/connections/used", q.Get("state"), q.Get("code")); err != nil {
				t.Fatalf("first completion: %v", err)
			}
			return acName, follow(t, e.start(acName).URL).Get("state"), q.Get("code")
		}, broker.ReasonCodeRejected},
		{"wrong redirect URI: the URL was changed on the way", func() (string, string, string) {
			u := e.start(acName).URL
			q := follow(t, strings.Replace(u, url.QueryEscape(acRedirect), url.QueryEscape(acRedirect2), 1))
			return acName, q.Get("state"), q.Get("code")
		}, broker.ReasonCodeRejected},
		{"expired state", func() (string, string, string) {
			q := follow(t, e.start(acName).URL)
			e.clock.Advance(10*time.Minute + time.Second)
			return acName, q.Get("state"), q.Get("code")
		}, broker.ReasonAuthorizationInvalid},
		{"unknown state", func() (string, string, string) {
			q := follow(t, e.start(acName).URL)
			return acName, "made-up-state-value-0123456789", q.Get("code")
		}, broker.ReasonAuthorizationInvalid},
		{"state of another connection", func() (string, string, string) {
			q := follow(t, e.start("tenants/acme/connections/other2").URL)
			return acName, q.Get("state"), q.Get("code")
		}, broker.ReasonAuthorizationInvalid},
		{"reused state", func() (string, string, string) {
			q := follow(t, e.start(acName).URL)
			if _, err := e.b.CompleteAuthorization(ctx, acName, q.Get("state"), "wrong-code-value-0123456789"); reasonOf(err) != broker.ReasonCodeRejected {
				t.Fatalf("first use of the state: %v", err)
			}
			return acName, q.Get("state"), q.Get("code")
		}, broker.ReasonAuthorizationInvalid},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			name, state, code := tc.complete()
			before := e.idp.Counts()
			_, err := e.b.CompleteAuthorization(ctx, name, state, code)
			if got := reasonOf(err); got != tc.wantReason || !errors.Is(err, broker.ErrAuthorization) {
				t.Fatalf("err = %v (reason %q), want ErrAuthorization with reason %s", err, got, tc.wantReason)
			}
			if _, err := e.store.GetConnection(ctx, name); !errors.Is(err, storage.ErrNotFound) {
				t.Fatalf("a refused completion stored %s: %v", name, err)
			}
			if _, err := e.b.GetConnection(ctx, name); !errors.Is(err, broker.ErrNotFound) {
				t.Fatalf("a refused completion left %s in memory: %v", name, err)
			}
			after := e.idp.Counts()
			if tc.wantReason == broker.ReasonAuthorizationInvalid && after.CodeGrants != before.CodeGrants {
				t.Fatalf("a refused state still sent the code upstream")
			}
			if after.OpenSessions > before.OpenSessions {
				t.Fatalf("a refused completion left a session open upstream: %d -> %d", before.OpenSessions, after.OpenSessions)
			}
			assertNoSecrets(t, e, err.Error())
		})
	}
}

// directChain gets a refresh token straight from the stand-in, as another
// tool would hold it: through the authorization-code client with its own
// PKCE pair.
func directChain(t *testing.T, e *env) string {
	t.Helper()
	verifier := strings.Repeat("v", 50)
	sum := sha256.Sum256([]byte(verifier))
	q := url.Values{"response_type": {"code"}, "client_id": {acClientID}, "redirect_uri": {acRedirect},
		"scope": {"api offline_access"}, "state": {"elsewhere-state-0123456789"},
		"code_challenge": {base64.RawURLEncoding.EncodeToString(sum[:])}, "code_challenge_method": {"S256"}}
	code := follow(t, e.http.URL+"/identity/connect/authorize?"+q.Encode()).Get("code")
	resp, err := http.PostForm(e.http.URL+"/identity/connect/token", url.Values{"grant_type": {"authorization_code"},
		"code": {code}, "redirect_uri": {acRedirect}, "code_verifier": {verifier}, "client_id": {acClientID}, "client_secret": {clientSecret}})
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	var body struct {
		RefreshToken string `json:"refresh_token"`
	}
	if err := json.NewDecoder(resp.Body).Decode(&body); err != nil || body.RefreshToken == "" {
		t.Fatalf("direct exchange: %d %v", resp.StatusCode, err)
	}
	return body.RefreshToken
}

func TestImportRefreshTokenProvesItWithOneRefresh(t *testing.T) {
	e := newEnv(t).withAuthCode()
	ctx := context.Background()
	imported := directChain(t, e)
	before := e.idp.Counts()

	v, err := e.b.ImportRefreshToken(ctx, broker.Target{Conn: e.acConn(acName)}, imported, false)
	if err != nil {
		t.Fatalf("ImportRefreshToken: %v", err)
	}
	after := e.idp.Counts()
	if after.RefreshGrants-before.RefreshGrants != 1 || after.PasswordGrants != 0 || after.CodeGrants != before.CodeGrants {
		t.Fatalf("upstream saw %+v after %+v; want exactly one refresh grant and no sign-in", after, before)
	}
	stored, err := e.store.GetTokens(ctx, acName)
	if err != nil || stored.RefreshToken == "" || stored.RefreshToken == imported {
		t.Fatalf("stored chain: %v; want the rotated refresh token committed", err)
	}
	if v.State != broker.StateActive {
		t.Fatalf("state %s after import", v.State)
	}
	if _, err := e.b.GetAccessToken(ctx, acName, time.Minute, ""); err != nil {
		t.Fatal(err)
	}
	if e.idp.Counts().RefreshGrants != after.RefreshGrants {
		t.Fatal("the token the import committed was not served from memory")
	}
	assertNoSecrets(t, e, viewText(v))

	t.Run("refused token stores nothing", func(t *testing.T) {
		name := "tenants/acme/connections/refused"
		_, err := e.b.ImportRefreshToken(ctx, broker.Target{Conn: e.acConn(name)}, imported, false) // spent by the import above
		if reasonOf(err) != broker.ReasonImportRejected {
			t.Fatalf("err = %v, want reason %s", err, broker.ReasonImportRejected)
		}
		if _, err := e.store.GetConnection(ctx, name); !errors.Is(err, storage.ErrNotFound) {
			t.Fatalf("refused import stored something: %v", err)
		}
		assertNoSecrets(t, e, err.Error())
	})
	t.Run("password flow, new connection", func(t *testing.T) {
		resp, err := http.PostForm(e.http.URL+"/identity/connect/token", url.Values{"grant_type": {"password"},
			"client_id": {clientID}, "client_secret": {clientSecret}, "username": {username}, "password": {password}, "scope": {"api offline_access"}})
		if err != nil {
			t.Fatal(err)
		}
		var body struct {
			RefreshToken string `json:"refresh_token"`
		}
		json.NewDecoder(resp.Body).Decode(&body)
		resp.Body.Close()
		pw := e.idp.Counts().PasswordGrants
		if _, err := e.b.ImportRefreshToken(ctx, broker.Target{Conn: e.conn()}, body.RefreshToken, false); err != nil {
			t.Fatalf("import into a password connection: %v", err)
		}
		if e.idp.Counts().PasswordGrants != pw {
			t.Fatal("importing into a password connection signed in")
		}
	})
	t.Run("validate only contacts nothing", func(t *testing.T) {
		c := e.idp.Counts()
		if _, err := e.b.ImportRefreshToken(ctx, broker.Target{Conn: e.acConn("tenants/acme/connections/dry")}, "anything-at-all", true); err != nil {
			t.Fatal(err)
		}
		if e.idp.Counts() != c {
			t.Fatal("validate_only contacted upstream")
		}
		if _, err := e.store.GetConnection(ctx, "tenants/acme/connections/dry"); !errors.Is(err, storage.ErrNotFound) {
			t.Fatal("validate_only stored something")
		}
	})
}

// TestDeadAuthCodeChainNeedsAuthorization: with no password to fall back
// on, a dead chain halts with AUTHORIZATION_REQUIRED after the one refresh
// upstream refused, whatever 20 concurrent callers and maintenance do, until
// an operator authorizes again.
func TestDeadAuthCodeChainNeedsAuthorization(t *testing.T) {
	e := newEnv(t).withAuthCode()
	ctx := context.Background()
	e.authorizeNew(acName)
	e.idp.RevokeRefreshTokens()
	e.clock.Advance(2 * time.Hour)
	before := e.idp.Counts()

	var wg sync.WaitGroup
	errs := make([]error, 20)
	for i := range errs {
		wg.Add(1)
		go func() {
			defer wg.Done()
			_, errs[i] = e.b.GetAccessToken(ctx, acName, time.Minute, "")
		}()
	}
	wg.Wait()
	for i, err := range errs {
		if reasonOf(err) != broker.ReasonAuthorizationRequired {
			t.Fatalf("caller %d: err = %v, want reason %s", i, err, broker.ReasonAuthorizationRequired)
		}
	}
	e.b.Maintain()
	e.b.Settle()
	e.clock.Advance(30 * 24 * time.Hour)
	e.b.Maintain()
	e.b.Settle()
	if _, err := e.b.GetAccessToken(ctx, acName, time.Minute, ""); reasonOf(err) != broker.ReasonAuthorizationRequired {
		t.Fatalf("later call: %v", err)
	}
	after := e.idp.Counts()
	if after.RefreshGrants-before.RefreshGrants != 1 || after.PasswordGrants != 0 || after.CodeGrants != before.CodeGrants {
		t.Fatalf("upstream saw %+v after %+v; want the one refused refresh and nothing else", after, before)
	}
	view, _ := e.b.GetConnection(ctx, acName)
	if view.State != broker.StateNeedsReauth || view.Status.StateReason != broker.ReasonAuthorizationRequired {
		t.Fatalf("state %s reason %s", view.State, view.Status.StateReason)
	}
	if states := e.b.Census().States; states[broker.StateNeedsReauth] != 1 {
		t.Fatalf("census (the metrics' source) shows %v, want one NEEDS_REAUTH", states)
	}
	// The halt is durable.
	e.restart()
	if _, err := e.b.GetAccessToken(ctx, acName, time.Minute, ""); reasonOf(err) != broker.ReasonAuthorizationRequired {
		t.Fatalf("after restart: %v", err)
	}
	if e.idp.Counts() != after {
		t.Fatal("a restart called upstream for a halted connection")
	}

	// An operator authorizes again: the same connection is ACTIVE.
	a, err := e.b.StartAuthorization(ctx, broker.Target{Conn: &storage.Connection{Name: acName}, Existing: true}, false)
	if err != nil {
		t.Fatalf("StartAuthorization of the existing connection: %v", err)
	}
	q := follow(t, a.URL)
	view, err = e.b.CompleteAuthorization(ctx, acName, q.Get("state"), q.Get("code"))
	if err != nil || view.State != broker.StateActive {
		t.Fatalf("re-authorization: %v %+v", err, view)
	}
	if _, err := e.b.GetAccessToken(ctx, acName, time.Minute, ""); err != nil {
		t.Fatalf("after re-authorization: %v", err)
	}
}

func TestAuthorizationCodeInputRules(t *testing.T) {
	e := newEnv(t).withAuthCode()
	ctx := context.Background()
	tests := []struct {
		name      string
		edit      func(*storage.Connection)
		wantField string
	}{
		{"password on an authorization-code connection", func(c *storage.Connection) { c.Password = "pw" }, "password"},
		{"username on an authorization-code connection", func(c *storage.Connection) { c.Username = "u" }, "username"},
		{"no redirect URI", func(c *storage.Connection) { c.RedirectURI = "" }, "redirect_uri"},
		{"plain http beyond loopback", func(c *storage.Connection) { c.RedirectURI = "http://app.example.com/cb" }, "redirect_uri"},
		{"fragment", func(c *storage.Connection) { c.RedirectURI = acRedirect + "#x" }, "redirect_uri"},
		{"relative", func(c *storage.Connection) { c.RedirectURI = "/callback" }, "redirect_uri"},
		{"unknown flow", func(c *storage.Connection) { c.Flow = "implicit" }, "flow"},
		{"redirect URI on a password connection", func(c *storage.Connection) {
			c.Flow, c.Username, c.Password = storage.FlowPassword, username, password
		}, "redirect_uri"},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			c := e.acConn(acName)
			tc.edit(c)
			for _, call := range []func() error{
				func() error { _, err := e.b.StartAuthorization(ctx, broker.Target{Conn: c}, true); return err },
				func() error { _, err := e.b.ImportRefreshToken(ctx, broker.Target{Conn: c}, "rt", true); return err },
				func() error { _, err := e.b.CreateConnection(ctx, c, true); return err },
			} {
				var be *broker.Error
				if err := call(); !errors.As(err, &be) || !errors.Is(err, broker.ErrInvalidArgument) || len(be.Violations) == 0 || be.Violations[0].Field != tc.wantField {
					t.Fatalf("err = %v, want INVALID_ARGUMENT on %s", err, tc.wantField)
				}
			}
		})
	}
	t.Run("loopback http redirect is fine", func(t *testing.T) {
		c := e.acConn(acName)
		c.RedirectURI = "http://127.0.0.1:8765/callback"
		if _, err := e.b.StartAuthorization(ctx, broker.Target{Conn: c}, true); err != nil {
			t.Fatal(err)
		}
	})
	t.Run("create refuses an authorization-code connection but validates it", func(t *testing.T) {
		if _, err := e.b.CreateConnection(ctx, e.acConn(acName), true); err != nil {
			t.Fatalf("validate_only: %v", err)
		}
		if _, err := e.b.CreateConnection(ctx, e.acConn(acName), false); !errors.Is(err, broker.ErrInvalidArgument) {
			t.Fatalf("create: %v, want INVALID_ARGUMENT", err)
		}
	})
	t.Run("start refuses a password connection", func(t *testing.T) {
		if _, err := e.b.StartAuthorization(ctx, broker.Target{Conn: e.conn()}, false); !errors.Is(err, broker.ErrInvalidArgument) {
			t.Fatalf("err = %v", err)
		}
	})
	t.Run("updates", func(t *testing.T) {
		e.authorizeNew(acName)
		_, err := e.b.UpdateConnection(ctx, acName, &storage.Connection{Password: "pw"}, []string{"password"}, "", false)
		if !errors.Is(err, broker.ErrInvalidArgument) {
			t.Fatalf("password on an authorization-code connection: %v", err)
		}
		_, err = e.b.UpdateConnection(ctx, acName, &storage.Connection{ClientSecret: "new"}, []string{"client_secret"}, "", false)
		if !errors.Is(err, broker.ErrInvalidArgument) {
			t.Fatalf("client_secret without a proof: %v", err)
		}
		v, err := e.b.UpdateConnection(ctx, acName, &storage.Connection{RedirectURI: acRedirect2}, []string{"redirect_uri"}, "", false)
		if err != nil || v.Conn.RedirectURI != acRedirect2 {
			t.Fatalf("redirect_uri update: %v", err)
		}
		// A new client secret comes with a new authorization.
		e.idp.AddAuthCodeClient(acClientID, "second-secret-value", acRedirect, acRedirect2)
		a, err := e.b.StartAuthorization(ctx, broker.Target{Conn: &storage.Connection{Name: acName, ClientSecret: "second-secret-value"},
			Existing: true, Fields: []string{"client_secret"}}, false)
		if err != nil {
			t.Fatal(err)
		}
		q := follow(t, a.URL)
		if _, err := e.b.CompleteAuthorization(ctx, acName, q.Get("state"), q.Get("code")); err != nil {
			t.Fatalf("completion with the new secret: %v", err)
		}
		cfg, _ := e.store.GetConnection(ctx, acName)
		if cfg.ClientSecret != "second-secret-value" {
			t.Fatal("the completed authorization did not store the masked field")
		}
	})
}

// TestAuthorizationCompletesOnAnotherReplica: with etcd, the completion
// may reach another replica than the start; the state is still used once,
// and the verifier is sealed in the cluster.
func TestAuthorizationCompletesOnAnotherReplica(t *testing.T) {
	clk := testkit.NewClock()
	idp := acumaticatest.New(acumaticatest.Options{Now: clk.Now})
	idp.AddAuthCodeClient(acClientID, clientSecret, acRedirect)
	idp.SetConsentUser(username)
	hs := idp.Start()
	defer hs.Close()
	endpoint := etcdtest.Start(t)
	a, b := replica(t, endpoint, clk), replica(t, endpoint, clk)
	ctx := context.Background()
	conn := &storage.Connection{Name: acName, InstanceURL: hs.URL, ClientID: acClientID, ClientSecret: clientSecret,
		Flow: storage.FlowAuthorizationCode, RedirectURI: acRedirect}

	started, err := a.StartAuthorization(ctx, broker.Target{Conn: conn}, false)
	if err != nil {
		t.Fatal(err)
	}
	cli := etcdtest.Client(t, endpoint)
	raw, err := cli.Get(ctx, "/tokenbroker/authorizations/", clientv3.WithPrefix())
	if err != nil || raw.Count != 1 {
		t.Fatalf("pending authorizations in etcd: %v %v", raw, err)
	}
	q := follow(t, started.URL)
	if strings.Contains(string(raw.Kvs[0].Key)+string(raw.Kvs[0].Value), q.Get("state")) ||
		strings.Contains(string(raw.Kvs[0].Value), clientSecret) {
		t.Fatal("the state or the client secret is stored in plain text")
	}
	v, err := b.CompleteAuthorization(ctx, acName, q.Get("state"), q.Get("code"))
	if err != nil || v.State != broker.StateActive {
		t.Fatalf("completion on the other replica: %v", err)
	}
	for _, sec := range idp.Issued() {
		if strings.Contains(string(raw.Kvs[0].Value), sec) {
			t.Fatalf("%.8s... (a verifier, state or code) is stored in plain text", sec)
		}
	}
	if _, err := a.CompleteAuthorization(ctx, acName, q.Get("state"), q.Get("code")); reasonOf(err) != broker.ReasonAuthorizationInvalid {
		t.Fatalf("the state used on one replica was accepted on the other: %v", err)
	}
	testkit.Eventually(t, "replica a to see the connection", func() bool {
		_, err := a.GetAccessToken(ctx, acName, time.Minute, "")
		return err == nil
	})
	if c := idp.Counts(); c.CodeGrants != 1 || c.PasswordGrants != 0 {
		t.Fatalf("upstream saw %+v", c)
	}
}

// TestImportIntoExistingConnection: importing a refresh token into a
// connection whose chain died brings it back with one refresh grant; the
// configuration named in the mask changes with it.
func TestImportIntoExistingConnection(t *testing.T) {
	e := newEnv(t).withAuthCode()
	ctx := context.Background()
	e.authorizeNew(acName)
	e.idp.RevokeRefreshTokens()
	e.clock.Advance(2 * time.Hour)
	if _, err := e.b.GetAccessToken(ctx, acName, time.Minute, ""); reasonOf(err) != broker.ReasonAuthorizationRequired {
		t.Fatalf("dead chain: %v", err)
	}
	imported := directChain(t, e)
	before := e.idp.Counts()
	v, err := e.b.ImportRefreshToken(ctx, broker.Target{Conn: &storage.Connection{Name: acName, DisplayName: "Fulfillment"},
		Existing: true, Fields: []string{"display_name"}}, imported, false)
	if err != nil {
		t.Fatalf("import: %v", err)
	}
	if v.State != broker.StateActive || v.Conn.DisplayName != "Fulfillment" || v.Status.StateReason != "" {
		t.Fatalf("after import: %+v", v)
	}
	if _, err := e.b.GetAccessToken(ctx, acName, time.Minute, ""); err != nil {
		t.Fatal(err)
	}
	after := e.idp.Counts()
	if after.RefreshGrants-before.RefreshGrants != 1 || after.PasswordGrants != 0 {
		t.Fatalf("upstream saw %+v after %+v", after, before)
	}
	stored, err := e.store.GetTokens(ctx, acName)
	if err != nil || stored.IntentGrant != "" || stored.RefreshToken == imported || stored.State != string(broker.StateActive) {
		t.Fatalf("stored %+v %v", stored, err)
	}
}

// TestAuthorizationEndpointFromDiscovery: the authorization URL uses the
// discovery document's authorization_endpoint when it is on the
// instance's origin, and /identity/connect/authorize otherwise.
func TestAuthorizationEndpointFromDiscovery(t *testing.T) {
	for _, tc := range []struct {
		name      string
		discovery func(base string) (int, string)
		wantPath  string
	}{
		{"advertised", func(base string) (int, string) {
			return 200, `{"authorization_endpoint": "` + base + `/identity/connect/authorize2"}`
		}, "/identity/connect/authorize2"},
		{"no discovery", func(string) (int, string) { return 404, "" }, "/identity/connect/authorize"},
		{"on another origin", func(string) (int, string) {
			return 200, `{"authorization_endpoint": "https://evil.example.com/authorize"}`
		}, "/identity/connect/authorize"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			var base string
			hs := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
				status, body := tc.discovery(base)
				w.WriteHeader(status)
				w.Write([]byte(body))
			}))
			defer hs.Close()
			base = hs.URL
			e := newEnv(t)
			c := e.acConn(acName)
			c.InstanceURL = hs.URL
			a, err := e.b.StartAuthorization(context.Background(), broker.Target{Conn: c}, false)
			if err != nil {
				t.Fatal(err)
			}
			u, _ := url.Parse(a.URL)
			if got := u.Scheme + "://" + u.Host + u.Path; got != hs.URL+tc.wantPath {
				t.Fatalf("authorization endpoint %s, want %s", got, hs.URL+tc.wantPath)
			}
		})
	}
}

// TestAuthorizationStartedBeforeRecreateIsRefused: an update authorization
// started before a delete cannot complete onto the connection re-created
// under the same name (which starts again at revision 1): it is refused
// as a conflict, no code is sent upstream and nothing stored changes.
func TestAuthorizationStartedBeforeRecreateIsRefused(t *testing.T) {
	e := newEnv(t).withAuthCode()
	ctx := context.Background()
	e.authorizeNew(acName)
	a, err := e.b.StartAuthorization(ctx, broker.Target{Conn: &storage.Connection{Name: acName, DisplayName: "Old plan"},
		Existing: true, Fields: []string{"display_name"}}, false)
	if err != nil {
		t.Fatalf("StartAuthorization (update): %v", err)
	}
	q := follow(t, a.URL)
	if err := e.b.DeleteConnection(ctx, acName, ""); err != nil {
		t.Fatalf("DeleteConnection: %v", err)
	}
	e.clock.Advance(time.Second)
	recreated := e.authorizeNew(acName)
	if recreated.Conn.Revision != 1 {
		t.Fatalf("re-created connection has revision %d; the test needs it to start again at 1", recreated.Conn.Revision)
	}
	beforeConn, err1 := e.store.GetConnection(ctx, acName)
	beforeTok, err2 := e.store.GetTokens(ctx, acName)
	if err := errors.Join(err1, err2); err != nil {
		t.Fatal(err)
	}
	codes := e.idp.Counts().CodeGrants

	_, err = e.b.CompleteAuthorization(ctx, acName, q.Get("state"), q.Get("code"))
	if !errors.Is(err, broker.ErrConflict) || reasonOf(err) != broker.ReasonEtagMismatch {
		t.Fatalf("completing onto the re-created connection: err = %v, want ErrConflict with reason %s", err, broker.ReasonEtagMismatch)
	}
	afterConn, err1 := e.store.GetConnection(ctx, acName)
	afterTok, err2 := e.store.GetTokens(ctx, acName)
	if err := errors.Join(err1, err2); err != nil {
		t.Fatal(err)
	}
	if afterConn.DisplayName == "Old plan" || afterConn.Revision != beforeConn.Revision || afterTok.RefreshToken != beforeTok.RefreshToken || afterTok.IntentGrant != "" {
		t.Fatalf("a refused completion changed the stored connection: %+v -> %+v", beforeConn, afterConn)
	}
	if got := e.idp.Counts().CodeGrants; got != codes {
		t.Fatalf("a refused completion sent the code upstream (%d -> %d code grants)", codes, got)
	}
	assertNoSecrets(t, e, err.Error())
}
