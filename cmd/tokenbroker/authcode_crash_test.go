package main

import (
	"context"
	"net/http"
	"net/http/httptest"
	"net/url"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"google.golang.org/genproto/googleapis/rpc/errdetails"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"

	pb "tokenbroker/gen/tokenbroker/v1"

	"tokenbroker/broker/acumaticatest"
)

const (
	acClientID = "5B3F0E3A-8D4C-4E1B-9A0F-2C6D7E8F9A1B@MyTenant"
	acRedirect = "http://127.0.0.1:8765/callback"
	acName     = "tenants/acme/connections/destination"
)

// followAuthorization opens an authorization URL as curl without -L does
// and returns the redirect's state and code.
func followAuthorization(t *testing.T, authURL string) (state, code string) {
	t.Helper()
	hc := &http.Client{CheckRedirect: func(*http.Request, []*http.Request) error { return http.ErrUseLastResponse }}
	resp, err := hc.Get(authURL)
	if err != nil {
		t.Fatal(err)
	}
	resp.Body.Close()
	loc, err := url.Parse(resp.Header.Get("Location"))
	if err != nil || resp.StatusCode != http.StatusFound {
		t.Fatalf("authorize: %d %v", resp.StatusCode, err)
	}
	return loc.Query().Get("state"), loc.Query().Get("code")
}

func startAuthorization(t *testing.T, c pb.TokenBrokerClient, req *pb.StartAuthorizationRequest) (state, code string) {
	t.Helper()
	r, err := c.StartAuthorization(context.Background(), req)
	if err != nil {
		t.Fatalf("StartAuthorization: %v", err)
	}
	return followAuthorization(t, r.GetAuthorizationUrl())
}

func newAuthorization(instance string) *pb.StartAuthorizationRequest {
	return &pb.StartAuthorizationRequest{Parent: "tenants/acme", ConnectionId: "destination", Connection: &pb.Connection{
		InstanceUrl: instance, ClientId: acClientID, ClientSecret: clientSecret,
		Flow: pb.Connection_FLOW_AUTHORIZATION_CODE, RedirectUri: acRedirect,
	}}
}

// startAuthCodeBroker starts a stand-in identity server that knows the
// authorization-code client and the consenting user, and a broker on a
// fresh data dir; args start the broker again on the same dir.
func startAuthCodeBroker(t *testing.T) (s *acumaticatest.Server, instance string, p *proc, args []string) {
	t.Helper()
	s = acumaticatest.New(acumaticatest.Options{})
	s.AddAuthCodeClient(acClientID, clientSecret, acRedirect)
	s.SetConsentUser(username)
	s.AddUser(username, password)
	hs := httptest.NewServer(s.Handler())
	t.Cleanup(hs.Close)
	dir := filepath.Join(t.TempDir(), "data")
	args = []string{"--data-dir", dir, "--listen", "127.0.0.1:0"}
	return s, hs.URL, start(t, nil, args...), args
}

// TestKill9DuringCodeExchange kills the real binary while upstream holds
// CompleteAuthorization's code exchange, before and after upstream
// processed it. After a restart the connection either works (a live token
// upstream, ACTIVE) or does not exist; never a half-made one.
func TestKill9DuringCodeExchange(t *testing.T) {
	for _, tc := range []struct {
		name     string
		existing bool // re-authorize a working connection rather than create one
		fault    func() (acumaticatest.Fault, chan struct{})
	}{
		{"new connection, before upstream processed the code", false, func() (acumaticatest.Fault, chan struct{}) {
			ch := make(chan struct{}, 1)
			return acumaticatest.Fault{Arrived: ch, Delay: time.Minute}, ch
		}},
		{"new connection, after upstream issued the chain", false, func() (acumaticatest.Fault, chan struct{}) {
			ch := make(chan struct{}, 1)
			return acumaticatest.Fault{Processed: ch, HoldAfterProcess: time.Minute}, ch
		}},
		{"existing connection, after upstream issued the new chain", true, func() (acumaticatest.Fault, chan struct{}) {
			ch := make(chan struct{}, 1)
			return acumaticatest.Fault{Processed: ch, HoldAfterProcess: time.Minute}, ch
		}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			s, instance, p, args := startAuthCodeBroker(t)
			c := p.client()
			ctx := context.Background()

			var state, code string
			if tc.existing {
				state, code = startAuthorization(t, c, newAuthorization(instance))
				if _, err := c.CompleteAuthorization(ctx, &pb.CompleteAuthorizationRequest{Name: acName, State: state, Code: code}); err != nil {
					t.Fatal(err)
				}
				state, code = startAuthorization(t, c, &pb.StartAuthorizationRequest{Name: acName})
			} else {
				state, code = startAuthorization(t, c, newAuthorization(instance))
			}
			fault, moment := tc.fault()
			s.Inject(fault)
			done := make(chan error, 1)
			go func() {
				_, err := c.CompleteAuthorization(ctx, &pb.CompleteAuthorizationRequest{Name: acName, State: state, Code: code})
				done <- err
			}()
			select {
			case <-moment:
			case err := <-done:
				t.Fatalf("completion ended before the kill: %v", err)
			}
			p.kill9()
			if err := <-done; err == nil {
				t.Fatal("completion succeeded although the broker was killed during the exchange")
			}
			s.ClearFaults()

			p = start(t, nil, args...)
			c = p.client()
			got, err := c.GetConnection(ctx, &pb.GetConnectionRequest{Name: acName})
			switch {
			case tc.existing && err != nil:
				t.Fatalf("the existing connection is gone after the crash: %v", err)
			case !tc.existing && status.Code(err) != codes.NotFound:
				t.Fatalf("after the crash GetConnection = %v, %v; want NOT_FOUND (nothing half-made)", got, err)
			}
			if tc.existing {
				tok, err := c.GetAccessToken(ctx, &pb.GetAccessTokenRequest{Name: acName})
				if err != nil || !s.AccessTokenValid(tok.GetAccessToken()) {
					t.Fatalf("the existing connection does not work after the crash: %v", err)
				}
				if st := got.GetConnection().GetState(); st == pb.Connection_STATE_NEEDS_REAUTH {
					t.Fatalf("state %v", st)
				}
			}
			// The pending authorization died with the process: its state is
			// refused, and a new authorization makes a working connection.
			_, err = c.CompleteAuthorization(ctx, &pb.CompleteAuthorizationRequest{Name: acName, State: state, Code: code})
			if status.Code(err) != codes.FailedPrecondition || !strings.Contains(err.Error(), "start the authorization again") {
				t.Fatalf("completion with the state of the killed process: %v", err)
			}
			req := newAuthorization(instance)
			if tc.existing {
				req = &pb.StartAuthorizationRequest{Name: acName}
			}
			state, code = startAuthorization(t, c, req)
			if _, err := c.CompleteAuthorization(ctx, &pb.CompleteAuthorizationRequest{Name: acName, State: state, Code: code}); err != nil {
				t.Fatalf("a new authorization after the crash: %v", err)
			}
			tok, err := c.GetAccessToken(ctx, &pb.GetAccessTokenRequest{Name: acName})
			if err != nil || !s.AccessTokenValid(tok.GetAccessToken()) {
				t.Fatalf("after the new authorization: %v", err)
			}
			if s.Counts().PasswordGrants != 0 {
				t.Fatal("an authorization-code connection signed in with a password")
			}
		})
	}
}

// TestKill9DuringAuthCodeRefresh: an authorization-code connection has no
// password to start over with, so after a crash during a refresh it
// presents its refresh token once more. Killed before upstream spent it,
// the connection goes on with no operator; killed after, the chain is lost
// and the connection says AUTHORIZATION_REQUIRED, with one reuse upstream
// and no further call.
func TestKill9DuringAuthCodeRefresh(t *testing.T) {
	for _, tc := range []struct {
		name       string
		fault      func() (acumaticatest.Fault, chan struct{})
		wantWorks  bool
		wantReuses int
	}{
		{"before upstream spent the refresh token", func() (acumaticatest.Fault, chan struct{}) {
			ch := make(chan struct{}, 1)
			return acumaticatest.Fault{Arrived: ch, Delay: time.Minute}, ch
		}, true, 0},
		{"after upstream spent the refresh token", func() (acumaticatest.Fault, chan struct{}) {
			ch := make(chan struct{}, 1)
			return acumaticatest.Fault{Processed: ch, HoldAfterProcess: time.Minute}, ch
		}, false, 1},
	} {
		t.Run(tc.name, func(t *testing.T) {
			s, instance, p, args := startAuthCodeBroker(t)
			c := p.client()
			ctx := context.Background()
			state, code := startAuthorization(t, c, newAuthorization(instance))
			if _, err := c.CompleteAuthorization(ctx, &pb.CompleteAuthorizationRequest{Name: acName, State: state, Code: code}); err != nil {
				t.Fatal(err)
			}
			tok, err := c.GetAccessToken(ctx, &pb.GetAccessTokenRequest{Name: acName})
			if err != nil {
				t.Fatal(err)
			}
			fault, moment := tc.fault()
			s.Inject(fault)
			go c.GetAccessToken(ctx, &pb.GetAccessTokenRequest{Name: acName, RejectedAccessToken: tok.GetAccessToken()})
			<-moment
			p.kill9()
			s.ClearFaults()
			before := s.Counts()

			p = start(t, nil, args...)
			c = p.client()
			got, err := c.GetAccessToken(ctx, &pb.GetAccessTokenRequest{Name: acName})
			if tc.wantWorks {
				if err != nil || !s.AccessTokenValid(got.GetAccessToken()) {
					t.Fatalf("after the crash: %v", err)
				}
			} else if st := status.Code(err); st != codes.FailedPrecondition || errorReason(err) != "AUTHORIZATION_REQUIRED" {
				t.Fatalf("after the crash: %v, want FAILED_PRECONDITION AUTHORIZATION_REQUIRED\n%+v\n%s", err, s.Counts(), p.out.String())
			}
			c.GetAccessToken(ctx, &pb.GetAccessTokenRequest{Name: acName})
			after := s.Counts()
			if after.ReuseDetected-before.ReuseDetected != tc.wantReuses || after.RefreshGrants-before.RefreshGrants != 1 || after.PasswordGrants != 0 {
				t.Fatalf("upstream saw %+v after %+v: want one refresh, %d reuse, no password grant", after, before, tc.wantReuses)
			}
			for _, sec := range s.Issued() {
				if strings.Contains(p.out.String(), sec) {
					t.Fatalf("%.8s... (a token, code, state or verifier) in the broker's output", sec)
				}
			}
		})
	}
}

// errorReason is the ErrorInfo reason of a status error.
func errorReason(err error) string {
	st, _ := status.FromError(err)
	for _, d := range st.Details() {
		if ei, ok := d.(*errdetails.ErrorInfo); ok {
			return ei.GetReason()
		}
	}
	return ""
}
