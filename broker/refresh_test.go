package broker_test

import (
	"context"
	"errors"
	"fmt"
	"net/http"
	"sync"
	"testing"
	"time"

	"tokenbroker/broker"
	"tokenbroker/broker/acumaticatest"
	"tokenbroker/storage"
)

// Tests of the cached path and the shared refresh: one upstream call for
// many callers, committed before handed out, reports of rejected tokens,
// upstream caps.

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
	runIDPsMu.Lock()
	runIDPs = append(runIDPs, healthy)
	runIDPsMu.Unlock()
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
