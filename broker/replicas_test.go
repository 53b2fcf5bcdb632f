package broker_test

import (
	"context"
	"errors"
	"sync"
	"testing"
	"time"

	"tokenbroker/broker"
	"tokenbroker/broker/acumaticatest"
	"tokenbroker/internal/testkit"
	"tokenbroker/storage"
	"tokenbroker/storage/etcd"
	"tokenbroker/storage/etcdtest"
)

// replica is one broker process on the shared etcd.
func replica(t *testing.T, endpoint string, clk *testkit.Clock) *broker.Broker {
	t.Helper()
	keys, _ := storage.NewKeyring(make([]byte, 32))
	st, err := etcd.Open(context.Background(), etcd.Options{Client: etcdtest.Client(t, endpoint), Keyring: keys})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { st.Close() })
	b, err := broker.New(broker.Options{Store: st, Locker: st, Watcher: st, Authorizations: st, Now: clk.Now, TickInterval: -1, AllowInsecureUpstream: true,
		BackoffBase: time.Millisecond, BackoffMax: 5 * time.Millisecond, Sleep: func(context.Context, time.Duration) error { return nil }})
	if err != nil {
		t.Fatal(err)
	}
	if _, err := b.Load(context.Background()); err != nil {
		t.Fatal(err)
	}
	b.Start()
	t.Cleanup(b.Close)
	return b
}

// replicaPair is two replicas on one embedded etcd, sharing a clock and a
// stand-in identity server that knows the test client and user.
type replicaPair struct {
	clk      *testkit.Clock
	idp      *acumaticatest.Server
	url      string // the identity server's
	endpoint string // etcd's
	a, b     *broker.Broker
}

// twoReplicas starts a replicaPair; opts configures the identity server,
// whose Now is the pair's clock.
func twoReplicas(t *testing.T, opts acumaticatest.Options) *replicaPair {
	t.Helper()
	clk := testkit.NewClock()
	opts.Now = clk.Now
	idp := acumaticatest.New(opts)
	idp.AddClient(clientID, clientSecret)
	idp.AddUser(username, password)
	hs := idp.Start()
	t.Cleanup(hs.Close)
	endpoint := etcdtest.Start(t)
	return &replicaPair{clk: clk, idp: idp, url: hs.URL, endpoint: endpoint, a: replica(t, endpoint, clk), b: replica(t, endpoint, clk)}
}

// create creates the password connection connName on replica a.
func (p *replicaPair) create(t *testing.T) {
	t.Helper()
	if _, err := p.a.CreateConnection(context.Background(), &storage.Connection{
		Name: connName, InstanceURL: p.url, ClientID: clientID, ClientSecret: clientSecret, Username: username, Password: password,
	}, false); err != nil {
		t.Fatal(err)
	}
}

// createSeenByB creates connName on replica a and waits until replica b
// reads it too.
func (p *replicaPair) createSeenByB(t *testing.T) {
	t.Helper()
	p.create(t)
	testkit.Eventually(t, "replica b to see the new connection", func() bool {
		_, err := p.b.GetConnection(context.Background(), connName)
		return err == nil
	})
}

func TestReplicasOnEtcdShareOneRefresh(t *testing.T) {
	p := twoReplicas(t, acumaticatest.Options{Latency: 20 * time.Millisecond})
	clk, idp, a, b := p.clk, p.idp, p.a, p.b
	p.createSeenByB(t)
	first, err := b.GetAccessToken(context.Background(), connName, time.Minute, "")
	if err != nil {
		t.Fatal(err)
	}

	clk.Advance(2 * time.Hour) // expired on both replicas
	before := idp.Counts()
	var wg sync.WaitGroup
	tokens := make([]string, 400)
	errs := make([]error, 400)
	for i := range 400 {
		r := a
		if i%2 == 1 {
			r = b
		}
		wg.Add(1)
		go func() {
			defer wg.Done()
			tok, err := r.GetAccessToken(context.Background(), connName, time.Minute, "")
			tokens[i], errs[i] = tok.AccessToken, err
		}()
	}
	wg.Wait()
	after := idp.Counts()
	if got := after.RefreshGrants - before.RefreshGrants; got != 1 {
		t.Errorf("refresh grants across two replicas = %d, want 1", got)
	}
	if after.PasswordGrants != before.PasswordGrants || after.InvalidGrant != 0 {
		t.Errorf("counts %+v", after)
	}
	for i := range tokens {
		if errs[i] != nil {
			t.Fatalf("caller %d: %v", i, errs[i])
		}
		if tokens[i] != tokens[0] || tokens[i] == first.AccessToken {
			t.Fatalf("caller %d got another token", i)
		}
	}

	// A refresh on one replica reaches the other's memory.
	c := idp.Counts()
	fresh, err := a.GetAccessToken(context.Background(), connName, time.Minute, tokens[0])
	if err != nil {
		t.Fatal(err)
	}
	testkit.Eventually(t, "replica b to serve a's new token", func() bool {
		tok, err := b.GetAccessToken(context.Background(), connName, time.Minute, "")
		return err == nil && tok.AccessToken == fresh.AccessToken
	})
	if got := idp.Counts().RefreshGrants - c.RefreshGrants; got != 1 {
		t.Errorf("refresh grants = %d, want 1 (b must not refresh on its own)", got)
	}

	// NEEDS_REAUTH on one replica halts the other.
	idp.AddClient(clientID, "rotated-away")
	clk.Advance(2 * time.Hour)
	if _, err := a.GetAccessToken(context.Background(), connName, time.Minute, ""); !errors.Is(err, broker.ErrCredentialsRejected) {
		t.Fatalf("err = %v", err)
	}
	testkit.Eventually(t, "replica b to see NEEDS_REAUTH", func() bool {
		v, err := b.GetConnection(context.Background(), connName)
		return err == nil && v.State == broker.StateNeedsReauth
	})
	c = idp.Counts()
	if _, err := b.GetAccessToken(context.Background(), connName, time.Minute, ""); !errors.Is(err, broker.ErrCredentialsRejected) {
		t.Errorf("b: err = %v", err)
	}
	if got := idp.Counts(); got.InvalidClient != c.InvalidClient || got.RefreshGrants != c.RefreshGrants {
		t.Errorf("b called upstream after a halted the connection: %+v", got)
	}

	// Deleting on one replica removes it from the other.
	if err := b.DeleteConnection(context.Background(), connName, ""); err != nil {
		t.Fatal(err)
	}
	testkit.Eventually(t, "replica a to forget the connection", func() bool {
		_, err := a.GetConnection(context.Background(), connName)
		return errors.Is(err, broker.ErrNotFound)
	})
}

// TestReplicasOnEtcdDropAChainAnotherAbandoned: a replica restarted after a
// crash mid-refresh revokes the possibly spent chain and signs its session
// out. While upstream still fails, the other replica must stop serving the
// signed-out access token and never present the abandoned refresh token:
// the abandonment reaches it through the watch like any newer token.
func TestReplicasOnEtcdDropAChainAnotherAbandoned(t *testing.T) {
	p := twoReplicas(t, acumaticatest.Options{})
	clk, idp, endpoint, a, b := p.clk, p.idp, p.endpoint, p.a, p.b
	p.create(t)
	var old broker.Token
	testkit.Eventually(t, "replica b to serve the first token", func() bool {
		tok, err := b.GetAccessToken(context.Background(), connName, time.Minute, "")
		old = tok
		return err == nil
	})

	// Replica a dies while its refresh is at the upstream: the intent record
	// stays in etcd.
	a.Close()
	keys, _ := storage.NewKeyring(make([]byte, 32))
	raw, err := etcd.Open(context.Background(), etcd.Options{Client: etcdtest.Client(t, endpoint), Keyring: keys})
	if err != nil {
		t.Fatal(err)
	}
	defer raw.Close()
	tok, err := raw.GetTokens(context.Background(), connName)
	if err != nil {
		t.Fatal(err)
	}
	tok.IntentGrant, tok.IntentGeneration, tok.IntentTime = "refresh_token", tok.Generation, clk.Now()
	if err := raw.PutTokens(context.Background(), connName, tok); err != nil {
		t.Fatal(err)
	}

	for range 1000 {
		idp.Inject(acumaticatest.Fault{Status: 503}) // upstream down for the sign-in
	}
	before := idp.Counts()
	restarted := replica(t, endpoint, clk)
	restarted.Maintain()
	testkit.Eventually(t, "replica b to stop serving the signed-out token", func() bool {
		tok, err := b.GetAccessToken(context.Background(), connName, time.Minute, "")
		return err != nil || tok.AccessToken != old.AccessToken
	})
	after := idp.Counts()
	if after.Revocations == before.Revocations {
		t.Error("the possibly spent refresh token was not revoked")
	}
	if after.RefreshGrants != before.RefreshGrants || after.ReuseDetected != 0 {
		t.Errorf("counts %+v -> %+v: the abandoned refresh token was presented again", before, after)
	}
}
