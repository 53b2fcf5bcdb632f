package main

import (
	"context"
	"errors"
	"fmt"
	"net/http"
	"net/http/httptest"
	"path/filepath"
	"sync"
	"sync/atomic"
	"time"

	"golang.org/x/oauth2"

	"tokenbroker/broker"
	"tokenbroker/broker/acumaticatest"
	"tokenbroker/storage"
	"tokenbroker/storage/bolt"
)

type economyResult struct {
	conns            int
	hours            int
	calls            int64
	callerWaits      int64 // calls not served from memory
	callErrors       int64
	refreshGrants    int
	passwordAfter    int // password grants after the creating ones
	invalidGrants    int
	reuse            int
	refreshPerConnHr float64
}

type countObserver struct{ hits, misses atomic.Int64 }

func (o *countObserver) TokenRequest(string, string, time.Duration) {}
func (o *countObserver) CacheLookup(hit bool) {
	if hit {
		o.hits.Add(1)
	} else {
		o.misses.Add(1)
	}
}

// benchEconomy runs a simulated day (fake clock) of n connections with 1 h
// tokens, each asked for a token once a simulated minute.
func benchEconomy(dir string, n, hours int, logf func(string, ...any)) (*economyResult, error) {
	clk := &clock{t: time.Date(2026, 11, 24, 0, 0, 0, 0, time.UTC)}
	idp := acumaticatest.New(acumaticatest.Options{Now: clk.Now})
	idp.AddClient(clientID, clientSecret)
	idp.AddUser(username, password)
	hs := httptest.NewServer(idp.Handler())
	defer hs.Close()
	keys, _ := storage.NewKeyring(make([]byte, 32))
	st, err := bolt.Open(filepath.Join(dir, "economy.db"), bolt.Options{Keyring: keys})
	if err != nil {
		return nil, err
	}
	defer st.Close()
	obs := &countObserver{}
	b, err := broker.New(broker.Options{Store: st, Now: clk.Now, TickInterval: -1, Observer: obs, AllowInsecureUpstream: true})
	if err != nil {
		return nil, err
	}
	defer b.Close()
	names := make([]string, n)
	var wg sync.WaitGroup
	sem := make(chan struct{}, 32)
	var createErr atomic.Value
	for i := range n {
		names[i] = fmt.Sprintf("tenants/t%05d/connections/erp", i)
		wg.Add(1)
		sem <- struct{}{}
		go func() {
			defer wg.Done()
			defer func() { <-sem }()
			_, err := b.CreateConnection(context.Background(), &storage.Connection{
				Name: names[i], InstanceURL: hs.URL, ClientID: clientID, ClientSecret: clientSecret, Username: username, Password: password,
			}, false)
			if err != nil {
				createErr.Store(err)
			}
		}()
	}
	wg.Wait()
	if err, _ := createErr.Load().(error); err != nil {
		return nil, err
	}
	created := idp.Counts()
	res := &economyResult{conns: n, hours: hours}
	obs.hits.Store(0)
	obs.misses.Store(0)
	ctx := context.Background()
	for minute := 1; minute <= hours*60; minute++ {
		clk.Advance(time.Minute)
		for _, name := range names {
			if _, err := b.GetAccessToken(ctx, name, time.Minute, ""); err != nil {
				res.callErrors++
			}
			res.calls++
		}
		b.Maintain()
		b.Settle()
		if minute%120 == 0 {
			logf("economy: simulated hour %d/%d", minute/60, hours)
		}
	}
	end := idp.Counts()
	res.callerWaits = obs.misses.Load()
	res.refreshGrants = end.RefreshGrants - created.RefreshGrants
	res.passwordAfter = end.PasswordGrants - created.PasswordGrants
	res.invalidGrants = end.InvalidGrant - created.InvalidGrant
	res.reuse = end.ReuseDetected
	res.refreshPerConnHr = float64(res.refreshGrants) / float64(n*hours)
	return res, nil
}

// baselineResult compares, in real time, services that each keep their own
// golang.org/x/oauth2 token source on one shared user and initial token,
// with the same callers going through the broker.
type baselineResult struct {
	conns, services        int
	duration, lifetime     time.Duration
	oauth2Password         int // password grants after the first per connection
	oauth2Refresh          int
	oauth2Reuse            int // refresh tokens presented after being spent
	oauth2InvalidGrant     int
	oauth2Failures         int64 // Token() calls that failed
	brokerPassword         int
	brokerRefresh          int
	brokerReuse            int
	brokerFailures         int64
	oauth2Calls, brokCalls int64
}

func benchBaseline(dir string, conns, services int, dur, lifetime time.Duration) (*baselineResult, error) {
	res := &baselineResult{conns: conns, services: services, duration: dur, lifetime: lifetime}
	newIdP := func() (*acumaticatest.Server, *httptest.Server) {
		idp := acumaticatest.New(acumaticatest.Options{AccessTokenLifetime: lifetime})
		idp.AddClient(clientID, clientSecret)
		idp.AddUser(username, password)
		return idp, httptest.NewServer(idp.Handler())
	}
	// Without a broker.
	idp, hs := newIdP()
	defer hs.Close()
	ctx := context.WithValue(context.Background(), oauth2.HTTPClient, &http.Client{Timeout: 10 * time.Second})
	cfg := &oauth2.Config{
		ClientID: clientID, ClientSecret: clientSecret, Scopes: []string{"api", "offline_access"},
		// Explicit: auto-detection would resend a one-time refresh token.
		Endpoint: oauth2.Endpoint{TokenURL: hs.URL + "/identity/connect/token", AuthStyle: oauth2.AuthStyleInParams},
	}
	var wg sync.WaitGroup
	var calls, failures atomic.Int64
	deadline := time.Now().Add(dur)
	for range conns {
		first, err := cfg.PasswordCredentialsToken(ctx, username, password)
		if err != nil {
			return nil, err
		}
		for range services {
			wg.Add(1)
			go func() {
				defer wg.Done()
				src := oauth2.ReuseTokenSourceWithExpiry(first, cfg.TokenSource(ctx, first), lifetime/4)
				for time.Now().Before(deadline) {
					calls.Add(1)
					if _, err := src.Token(); err != nil {
						failures.Add(1)
						// What services do: sign in again with the password.
						tok, perr := cfg.PasswordCredentialsToken(ctx, username, password)
						if perr == nil {
							src = oauth2.ReuseTokenSourceWithExpiry(tok, cfg.TokenSource(ctx, tok), lifetime/4)
						}
					}
					time.Sleep(20 * time.Millisecond)
				}
			}()
		}
	}
	wg.Wait()
	c := idp.Counts()
	res.oauth2Password = c.PasswordGrants - conns
	res.oauth2Refresh, res.oauth2Reuse, res.oauth2InvalidGrant = c.RefreshGrants, c.ReuseDetected, c.InvalidGrant
	res.oauth2Failures, res.oauth2Calls = failures.Load(), calls.Load()

	// Through the broker.
	idp2, hs2 := newIdP()
	defer hs2.Close()
	keys, _ := storage.NewKeyring(make([]byte, 32))
	st, err := bolt.Open(filepath.Join(dir, "baseline.db"), bolt.Options{Keyring: keys})
	if err != nil {
		return nil, err
	}
	defer st.Close()
	b, err := broker.New(broker.Options{Store: st, TickInterval: 100 * time.Millisecond, AllowInsecureUpstream: true})
	if err != nil {
		return nil, err
	}
	b.Start()
	var names []string
	for i := range conns {
		name := fmt.Sprintf("tenants/t%d/connections/erp", i)
		if _, err := b.CreateConnection(context.Background(), &storage.Connection{
			Name: name, InstanceURL: hs2.URL, ClientID: clientID, ClientSecret: clientSecret, Username: username, Password: password,
		}, false); err != nil {
			return nil, err
		}
		names = append(names, name)
	}
	calls.Store(0)
	failures.Store(0)
	deadline = time.Now().Add(dur)
	for _, name := range names {
		for range services {
			wg.Add(1)
			go func() {
				defer wg.Done()
				for time.Now().Before(deadline) {
					calls.Add(1)
					if _, err := b.GetAccessToken(context.Background(), name, lifetime/4, ""); err != nil {
						failures.Add(1)
					}
					time.Sleep(20 * time.Millisecond)
				}
			}()
		}
	}
	wg.Wait()
	b.Close()
	c2 := idp2.Counts()
	res.brokerPassword = c2.PasswordGrants - conns
	res.brokerRefresh, res.brokerReuse = c2.RefreshGrants, c2.ReuseDetected
	res.brokerFailures, res.brokCalls = failures.Load(), calls.Load()
	if res.brokerFailures > 0 {
		return res, errors.New("baseline: broker callers failed")
	}
	return res, nil
}
