package client_test

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"io"
	"net/http"
	"net/http/httptest"
	"net/url"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"golang.org/x/oauth2"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"

	"tokenbroker/broker"
	"tokenbroker/broker/acumaticatest"
	"tokenbroker/client"
	"tokenbroker/storage"
)

// eventually waits, up to a minute (the machine may be busy), for cond,
// which a counted event elsewhere (a push on a stream, a refresh) makes
// true.
func eventually(t *testing.T, what string, cond func() bool) {
	t.Helper()
	deadline := time.Now().Add(time.Minute)
	for !cond() {
		if time.Now().After(deadline) {
			t.Fatalf("timed out waiting for %s", what)
		}
		time.Sleep(2 * time.Millisecond)
	}
}

func newClient(t *testing.T, r *rig, opts ...client.Option) *client.Client {
	t.Helper()
	if r.clock != nil {
		opts = append(opts, client.WithClock(r.now))
	}
	c := client.New(r.dial(), opts...)
	t.Cleanup(func() { c.Close() })
	return c
}

// TestThousandGoroutinesThroughRefreshesFailNothing is the proof:
// 1,000 goroutines send requests to the stand-in's protected resource
// through HTTPClient while the broker refreshes the token four times, and
// every refresh revokes the access token before it (RevokeAccessOnRefresh):
// requests in flight with the old token get 401, report it and are sent
// again. None fails; the refreshes are the token lifetimes', not the
// goroutines'.
func TestThousandGoroutinesThroughRefreshesFailNothing(t *testing.T) {
	r := newRig(rigOptions{fake: true,
		idp:    acumaticatest.Options{RevokeAccessOnRefresh: true, AccessTokenLifetime: time.Hour},
		broker: broker.Options{TickInterval: time.Millisecond}})
	defer r.close()
	c := newClient(t, r)
	hc := c.HTTPClient(erp)

	const workers, rotations = 1000, 4
	before := r.idp.Counts()
	var ok, failed atomic.Int64
	var firstFailure atomic.Value
	// epoch counts rotations that reached the client; seen[i] is the epoch
	// at which worker i started its last finished request. Tokens live an
	// hour and requests milliseconds, so no request spans two rotations:
	// the next rotation waits until every worker has finished a request
	// started after the last one (a starved goroutine must not turn into
	// one that outlives two token lifetimes).
	var epoch atomic.Int64
	seen := make([]atomic.Int64, workers)
	stop := make(chan struct{})
	var wg sync.WaitGroup
	for i := range workers {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for {
				select {
				case <-stop:
					return
				default:
				}
				e := epoch.Load()
				resp, err := hc.Get(r.entityURL())
				switch {
				case err != nil:
					failed.Add(1)
					firstFailure.CompareAndSwap(nil, err.Error())
				case resp.StatusCode != http.StatusOK:
					failed.Add(1)
					firstFailure.CompareAndSwap(nil, resp.Status)
				default:
					ok.Add(1)
				}
				if err == nil {
					io.Copy(io.Discard, resp.Body)
					resp.Body.Close()
				}
				seen[i].Store(e)
			}
		}()
	}
	allCaughtUp := func() bool {
		e := epoch.Load()
		for i := range seen {
			if seen[i].Load() < e {
				return false
			}
		}
		return true
	}
	ts := c.TokenSource(erp)
	var diag atomic.Value // what the broker said while a rotation was awaited
	defer func() {
		if t.Failed() {
			t.Log(diag.Load())
		}
	}()
	for i := range rotations {
		eventually(t, "every worker to finish a request on the current token", allCaughtUp)
		old, err := ts.Token()
		if err != nil {
			t.Fatal(err)
		}
		// Past 75% of the token's life: the broker's maintenance refreshes
		// it (the watch keeps it in use), the stand-in revokes the old one,
		// and the stream brings the new one.
		r.clock.Advance(50 * time.Minute)
		eventually(t, "the rotation to reach the client", func() bool {
			tok, err := ts.Token()
			if err == nil && tok.AccessToken != old.AccessToken {
				return true
			}
			if v, verr := r.b.GetConnection(context.Background(), erp); verr == nil {
				diag.Store(fmt.Sprintf("rotation %d: token err %v; broker state %s, last error %s %q, last refresh %v; clock %v; refresh grants %d; calls %d; streams %d",
					i+1, err, v.State, v.Status.LastErrorCode, v.Status.LastErrorMessage, v.Status.LastRefreshTime, r.now(),
					r.idp.Counts().RefreshGrants-before.RefreshGrants, r.unary.Load(), r.streams.Load()))
			}
			return false
		})
		epoch.Add(1)
		if got := r.idp.Counts().RefreshGrants - before.RefreshGrants; got != i+1 {
			t.Fatalf("after rotation %d: refresh grants = %d", i+1, got)
		}
	}
	eventually(t, "every worker to finish a request on the last token", allCaughtUp)
	close(stop)
	wg.Wait()

	if n := failed.Load(); n != 0 {
		t.Fatalf("%d of %d requests failed; first: %v", n, n+ok.Load(), firstFailure.Load())
	}
	after := r.idp.Counts()
	if got := after.RefreshGrants - before.RefreshGrants; got != rotations {
		t.Errorf("refresh grants = %d, want %d (one per token lifetime)", got, rotations)
	}
	if got := after.PasswordGrants - before.PasswordGrants; got != 0 {
		t.Errorf("password grants = %d, want 0", got)
	}
	// One call for the first token, and at most one report per revoked
	// token: not one per goroutine.
	if got := r.unary.Load(); got > 1+rotations {
		t.Errorf("GetAccessToken calls = %d (reports %d), want at most %d", got, r.reports.Load(), 1+rotations)
	}
	t.Logf("%d requests, %d refresh grants, %d GetAccessToken calls (%d reports), %d streams",
		ok.Load(), after.RefreshGrants-before.RefreshGrants, r.unary.Load(), r.reports.Load(), r.streams.Load())
}

func TestTokenSourceCoalescesMissesAndServesFromMemory(t *testing.T) {
	r := newRig(rigOptions{})
	defer r.close()
	r.noWatch.Store(true) // only GetAccessToken, to count it
	c := newClient(t, r)
	ts := c.TokenSource(erp)
	var wg sync.WaitGroup
	tokens := make([]*oauth2.Token, 200)
	errs := make([]error, 200)
	for i := range tokens {
		wg.Add(1)
		go func() {
			defer wg.Done()
			tokens[i], errs[i] = ts.Token()
		}()
	}
	wg.Wait()
	for i := range tokens {
		if errs[i] != nil {
			t.Fatal(errs[i])
		}
		if tokens[i].AccessToken != tokens[0].AccessToken {
			t.Fatal("concurrent misses got different tokens")
		}
	}
	if got := r.unary.Load(); got != 1 {
		t.Fatalf("GetAccessToken calls for 200 concurrent misses = %d, want 1", got)
	}
	for range 1000 {
		if _, err := ts.Token(); err != nil {
			t.Fatal(err)
		}
	}
	if got := r.unary.Load(); got != 1 {
		t.Fatalf("GetAccessToken calls after 1000 cached reads = %d, want 1", got)
	}
	// The real expiry, and the same cache for every source of the name.
	if d := time.Until(tokens[0].Expiry); d < 50*time.Minute || d > time.Hour {
		t.Errorf("expiry in %v, want the stand-in's hour", d)
	}
	if tok, _ := c.TokenSource(erp).Token(); tok.AccessToken != tokens[0].AccessToken || r.unary.Load() != 1 {
		t.Error("a second TokenSource of the same connection did not share the cache")
	}
}

func TestTokenSourceFallsBackToGetAccessTokenWhileTheStreamIsDown(t *testing.T) {
	r := newRig(rigOptions{fake: true})
	defer r.close()
	r.noWatch.Store(true)
	c := newClient(t, r, client.WithBackoff(time.Millisecond, 5*time.Millisecond))
	ts := c.TokenSource(erp)
	first, err := ts.Token()
	if err != nil {
		t.Fatal(err)
	}
	eventually(t, "the watch to try again", func() bool { return r.streams.Load() >= 3 })
	// The cached token comes within the margin: with no stream, the next
	// Token asks the broker, which refreshes.
	r.clock.Advance(59*time.Minute + 30*time.Second)
	next, err := ts.Token()
	if err != nil {
		t.Fatal(err)
	}
	if next.AccessToken == first.AccessToken || r.unary.Load() != 2 {
		t.Fatalf("fallback: new token %v, GetAccessToken calls %d (want 2)", next.AccessToken != first.AccessToken, r.unary.Load())
	}
	// The stream comes back and takes over: a rotation caused elsewhere
	// reaches the cache without a call.
	r.noWatch.Store(false)
	eventually(t, "the stream to reconnect", func() bool { return r.b.Stats().UpstreamRefresh.Load() >= 1 && r.streams.Load() >= 4 })
	rotated, err := r.b.GetAccessToken(context.Background(), erp, time.Minute, next.AccessToken)
	if err != nil {
		t.Fatal(err)
	}
	eventually(t, "the rotation to be pushed", func() bool {
		tok, err := ts.Token()
		return err == nil && tok.AccessToken == rotated.AccessToken
	})
	if got := r.unary.Load(); got != 2 {
		t.Errorf("GetAccessToken calls = %d, want 2: the push needs none", got)
	}
}

func TestRotationReportedByOneClientReachesAnother(t *testing.T) {
	r := newRig(rigOptions{idp: acumaticatest.Options{RevokeAccessOnRefresh: true}})
	defer r.close()
	reporter, watcher := newClient(t, r), newClient(t, r)
	wts := watcher.TokenSource(erp)
	first, err := wts.Token()
	if err != nil {
		t.Fatal(err)
	}
	eventually(t, "the watcher's stream", func() bool { return r.streams.Load() >= 1 })
	// The reporter's request is answered 401 (Acumatica ended the session
	// behind the broker's back, as a restart does): it reports the token,
	// and the broker signs in again.
	r.idp.RevokeRefreshTokens()
	resp, err := reporter.HTTPClient(erp).Get(r.entityURL())
	if err != nil {
		t.Fatal(err)
	}
	resp.Body.Close()
	if resp.StatusCode != http.StatusOK || r.reports.Load() != 1 {
		t.Fatalf("reporter: status %d after %d reports, want 200 after 1", resp.StatusCode, r.reports.Load())
	}
	calls := r.unary.Load()
	eventually(t, "the watcher to get the rotated token", func() bool {
		tok, err := wts.Token()
		return err == nil && tok.AccessToken != first.AccessToken
	})
	if r.unary.Load() != calls {
		t.Error("the watcher called GetAccessToken: the rotation should have come on its stream")
	}
}

func TestTransportReportsA401OnceForManyRequests(t *testing.T) {
	r := newRig(rigOptions{})
	defer r.close()
	r.noWatch.Store(true) // the client keeps the revoked token until it reports it
	c := newClient(t, r)
	hc := c.HTTPClient(erp)
	if _, err := c.TokenSource(erp).Token(); err != nil {
		t.Fatal(err)
	}
	r.idp.RevokeRefreshTokens()
	before := r.idp.Counts().PasswordGrants
	const n = 100
	var wg sync.WaitGroup
	codes := make([]int, n)
	for i := range n {
		wg.Add(1)
		go func() {
			defer wg.Done()
			// A body that can be sent again (GetBody is set); the stand-in's
			// resource is read with GET, and ignores it.
			req, _ := http.NewRequest(http.MethodGet, r.entityURL(), strings.NewReader(`{"OrderNbr":{"value":"SO1"}}`))
			resp, err := hc.Do(req)
			if err != nil {
				t.Error(err)
				return
			}
			resp.Body.Close()
			codes[i] = resp.StatusCode
		}()
	}
	wg.Wait()
	for i, c := range codes {
		if c == http.StatusUnauthorized {
			t.Fatalf("request %d: 401 after the replay", i)
		}
	}
	if got := r.reports.Load(); got != 1 {
		t.Errorf("reports = %d for %d requests that saw the same 401, want 1", got, n)
	}
	if got := r.idp.Counts().PasswordGrants - before; got != 1 {
		t.Errorf("password grants = %d, want 1 (the session was ended: one new sign-in)", got)
	}
}

// TestTransportSendsTheTokenOnlyToTheInstance: the bearer token goes to the
// connection's instance (scheme, host, port and virtual directory) and
// nowhere else, not even where the instance redirects.
func TestTransportSendsTheTokenOnlyToTheInstance(t *testing.T) {
	r := newRig(rigOptions{})
	defer r.close()
	const onprem = "tenants/acme/connections/onprem"
	if _, err := r.b.CreateConnection(context.Background(), &storage.Connection{
		Name: onprem, InstanceURL: r.idpURL + "/AcumaticaERP/", ClientID: clientID, ClientSecret: clientSecret, Username: username, Password: password,
	}, false); err != nil {
		t.Fatal(err)
	}
	other := httptest.NewServer(http.HandlerFunc(echoAuthorization))
	defer other.Close()
	c := newClient(t, r)
	tok, err := c.TokenSource(erp).Token()
	if err != nil {
		t.Fatal(err)
	}
	bearer := "Bearer " + tok.AccessToken
	redirect := func(to string) string { return r.idpURL + "/test/redirect?to=" + url.QueryEscape(to) }
	for _, tc := range []struct {
		conn, url, want string
	}{
		{erp, r.idpURL + "/test/authorization", bearer},
		{erp, redirect(r.idpURL + "/test/authorization"), bearer},
		{erp, other.URL + "/test/authorization", ""},
		{erp, redirect(other.URL + "/test/authorization"), ""},
		{erp, strings.Replace(r.idpURL, "127.0.0.1", "localhost", 1) + "/test/authorization", ""},
		{onprem, r.idpURL + "/test/authorization", ""},
		{onprem, r.idpURL + "/AcumaticaERPx/test/authorization", ""},
		{onprem, redirect(other.URL + "/AcumaticaERP/test/authorization"), ""},
	} {
		got := getBody(t, c.HTTPClient(tc.conn), tc.url)
		if got != tc.want {
			t.Errorf("%s through %s: Authorization %q, want %q", tc.url, tc.conn, got, tc.want)
		}
	}
	// The on-premise instance still gets its own token under its directory.
	resp, err := c.HTTPClient(onprem).Get(r.idpURL + "/AcumaticaERP/entity/Default/24.200.001/SalesOrder?$top=1")
	if err != nil {
		t.Fatal(err)
	}
	resp.Body.Close()
	if resp.StatusCode != http.StatusOK {
		t.Errorf("on-premise resource: status %d, want 200", resp.StatusCode)
	}
}

func getBody(t *testing.T, hc *http.Client, url string) string {
	t.Helper()
	resp, err := hc.Get(url)
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	b, err := io.ReadAll(resp.Body)
	if err != nil {
		t.Fatal(err)
	}
	return string(b)
}

func TestTransportReturnsThe401WhenTheBodyCannotBeSentAgain(t *testing.T) {
	r := newRig(rigOptions{})
	defer r.close()
	r.noWatch.Store(true)
	c := newClient(t, r)
	if _, err := c.TokenSource(erp).Token(); err != nil {
		t.Fatal(err)
	}
	r.idp.RevokeRefreshTokens()
	// A body without GetBody: read once, cannot be replayed.
	req, _ := http.NewRequest(http.MethodGet, r.entityURL(), io.NopCloser(bytes.NewReader([]byte(`{}`))))
	req.GetBody = nil
	req.ContentLength = 2
	resp, err := c.HTTPClient(erp).Do(req)
	if err != nil {
		t.Fatal(err)
	}
	resp.Body.Close()
	if resp.StatusCode != http.StatusUnauthorized {
		t.Fatalf("status %d, want the 401", resp.StatusCode)
	}
	// The token was still reported: the next request has the newer one.
	if r.reports.Load() != 1 {
		t.Fatalf("reports = %d, want 1", r.reports.Load())
	}
	resp, err = c.HTTPClient(erp).Get(r.entityURL())
	if err != nil {
		t.Fatal(err)
	}
	resp.Body.Close()
	if resp.StatusCode != http.StatusOK || r.reports.Load() != 1 {
		t.Fatalf("next request: %d after %d reports", resp.StatusCode, r.reports.Load())
	}
}

func TestErrorsKeepTheBrokersMeaning(t *testing.T) {
	r := newRig(rigOptions{broker: broker.Options{MaxAttempts: 1}})
	defer r.close()
	r.noWatch.Store(true)
	c := newClient(t, r)
	ts := c.TokenSource(erp)
	tok, err := ts.Token()
	if err != nil {
		t.Fatal(err)
	}

	// Acumatica ends the session and its token endpoint is down with
	// Retry-After: the report fails UNAVAILABLE with RetryInfo, the request
	// gets its 401, and no call is made until the delay has passed.
	r.idp.RevokeRefreshTokens()
	r.idp.Inject(acumaticatest.Fault{Status: 503, RetryAfter: "30"})
	resp, err := c.Transport(erp, nil).RoundTrip(mustRequest(r.entityURL()))
	if err != nil || resp.StatusCode != http.StatusUnauthorized {
		t.Fatalf("request during the outage: %v, want the 401", err)
	}
	resp.Body.Close()
	calls := r.unary.Load()
	_, err = ts.Token()
	var e *client.Error
	if !errors.Is(err, client.ErrUnavailable) || !errors.As(err, &e) || e.RetryAfter < 29*time.Second || e.Name != erp {
		t.Fatalf("during the outage: %v, want ErrUnavailable with RetryAfter >= 30s", err)
	}
	if status.Code(err) != codes.Unavailable {
		t.Errorf("status.Code = %v, want Unavailable", status.Code(err))
	}
	if r.unary.Load() != calls {
		t.Errorf("a call was made within the broker's RetryInfo")
	}
	if !strings.Contains(err.Error(), erp) || strings.Contains(err.Error(), tok.AccessToken) {
		t.Errorf("message %q: want the connection's name and no token", err)
	}

	// Unknown connection; deleted; halted.
	if _, err := c.TokenSource("tenants/acme/connections/ghost").Token(); !errors.Is(err, client.ErrNotFound) {
		t.Errorf("unknown connection: %v, want ErrNotFound", err)
	}
	if _, err := c.TokenSource("not a name").Token(); !errors.Is(err, client.ErrInvalidArgument) {
		t.Errorf("malformed name: %v, want ErrInvalidArgument", err)
	}
	r2 := newRig(rigOptions{})
	defer r2.close()
	c2 := newClient(t, r2)
	ts2 := c2.TokenSource(erp)
	tok2, err := ts2.Token()
	if err != nil {
		t.Fatal(err)
	}
	r2.idp.AddUser(username, "changed-by-someone") // ends the session; the password no longer works
	req := mustRequest(r2.entityURL())
	resp, err = c2.Transport(erp, nil).RoundTrip(req)
	if err != nil || resp.StatusCode != http.StatusUnauthorized {
		t.Fatalf("request after the password change: %v, want the 401", err)
	}
	resp.Body.Close()
	_, err = ts2.Token()
	if !errors.Is(err, client.ErrNeedsReauth) || !errors.As(err, &e) || e.Reason != "CREDENTIALS_REJECTED" {
		t.Fatalf("halted connection: %v, want ErrNeedsReauth (CREDENTIALS_REJECTED)", err)
	}
	if strings.Contains(err.Error(), tok2.AccessToken) || strings.Contains(err.Error(), password) {
		t.Error("error message holds a secret")
	}
}

func mustRequest(url string) *http.Request {
	req, err := http.NewRequest(http.MethodGet, url, nil)
	if err != nil {
		panic(err)
	}
	return req
}

func TestCloseStopsWatchesAndFailsWhatNeedsTheBroker(t *testing.T) {
	r := newRig(rigOptions{fake: true})
	defer r.close()
	c := client.New(r.dial(), client.WithClock(r.now))
	ts := c.TokenSource(erp)
	if _, err := ts.Token(); err != nil {
		t.Fatal(err)
	}
	eventually(t, "the watch", func() bool { return r.streams.Load() == 1 })
	if err := c.Close(); err != nil {
		t.Fatal(err)
	}
	if _, err := ts.Token(); err != nil {
		t.Errorf("a cached token is still served after Close: %v", err)
	}
	r.clock.Advance(2 * time.Hour)
	if _, err := ts.Token(); !errors.Is(err, client.ErrClosed) {
		t.Errorf("after Close, with the token expired: %v, want ErrClosed", err)
	}
}

// TestAnUnusedSourceReleasesItsWatch: a source nobody asks for a token
// closes its watch stream after the idle timeout and opens it again on the
// next use; one in use keeps its stream.
func TestAnUnusedSourceReleasesItsWatch(t *testing.T) {
	r := newRig(rigOptions{})
	defer r.close()
	const idle = 200 * time.Millisecond
	c := newClient(t, r, client.WithIdleTimeout(idle))
	ts := c.TokenSource(erp)
	if _, err := ts.Token(); err != nil {
		t.Fatal(err)
	}
	eventually(t, "the watch stream", func() bool { return r.open.Load() == 1 })
	eventually(t, "the idle watch to end", func() bool { return r.open.Load() == 0 })
	if _, err := ts.Token(); err != nil {
		t.Fatal(err)
	}
	eventually(t, "the watch to start again", func() bool { return r.open.Load() == 1 })
	if got := r.streams.Load(); got != 2 {
		t.Fatalf("streams opened = %d, want 2", got)
	}

	// Used every few milliseconds for several idle timeouts: one stream.
	var maxGap time.Duration
	last := time.Now()
	for end := last.Add(4 * idle); time.Now().Before(end); {
		if _, err := ts.Token(); err != nil {
			t.Fatal(err)
		}
		now := time.Now()
		maxGap, last = max(maxGap, now.Sub(last)), now
		time.Sleep(idle / 20)
	}
	if maxGap > idle/2 {
		t.Logf("the loop was starved for %v: too long to judge the stream kept", maxGap)
		return
	}
	if got := r.streams.Load(); got != 2 || r.open.Load() != 1 {
		t.Fatalf("streams opened = %d (open %d) while in use, want 2 (1)", got, r.open.Load())
	}
}

// TestADeletedConnectionIsWatchedAgainOnlyWhenAsked: once its stream ends
// with NOT_FOUND, a source opens none until asked for a token again.
func TestADeletedConnectionIsWatchedAgainOnlyWhenAsked(t *testing.T) {
	r := newRig(rigOptions{})
	defer r.close()
	const backoffMax = 5 * time.Millisecond
	c := newClient(t, r, client.WithBackoff(time.Millisecond, backoffMax))
	ts := c.TokenSource(erp)
	if _, err := ts.Token(); err != nil {
		t.Fatal(err)
	}
	eventually(t, "the watch stream", func() bool { return r.open.Load() == 1 })
	if err := r.b.DeleteConnection(context.Background(), erp, ""); err != nil {
		t.Fatal(err)
	}
	eventually(t, "the stream to end", func() bool { return r.open.Load() == 0 })
	opened := r.streams.Load()
	// Before, a terminal error was looked at again every backoffMax.
	time.Sleep(50 * backoffMax)
	if got := r.streams.Load(); got != opened {
		t.Fatalf("streams opened after NOT_FOUND = %d, want none", got-opened)
	}
	if _, err := ts.Token(); !errors.Is(err, client.ErrNotFound) {
		t.Fatalf("Token after delete: %v, want ErrNotFound", err)
	}
	eventually(t, "one stream for the new use", func() bool { return r.streams.Load() == opened+1 && r.open.Load() == 0 })
}
