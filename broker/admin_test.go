package broker_test

import (
	"context"
	"errors"
	"fmt"
	"net/http"
	"net/http/httptest"
	"sync/atomic"
	"testing"
	"time"

	"tokenbroker/broker"
	"tokenbroker/broker/acumaticatest"
)

// Tests of creating, updating and deleting connections.

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
