package main

import (
	"context"
	"fmt"
	"path/filepath"
	"slices"
	"sync/atomic"
	"time"

	pb "tokenbroker/gen/tokenbroker/v1"

	"tokenbroker/broker/acumaticatest"
	"tokenbroker/storage"
	"tokenbroker/storage/bolt"
	"tokenbroker/storage/etcd"
	"tokenbroker/storage/etcdtest"
)

// etcdResult is what running as replicas on etcd costs, against one process
// on a bbolt file, measured in the same run on the same disk.
type etcdResult struct {
	conns, samples     int
	boltP50, boltP99   time.Duration // one refresh's storage work on bbolt: intent, commit
	etcdP50, etcdP99   time.Duration // on etcd: lock, re-read, intent, commit, unlock
	loadBolt, loadEtcd time.Duration // LoadAll of conns connections, median of 3
	herdN, runs        int
	latency            time.Duration
	herdCalls          []int // upstream token requests per two-replica herd
	herdFailed         int   // callers without a token
	herdDistinct       int   // most distinct tokens handed out by one herd
	herdEtcd, herdBolt time.Duration
}

// benchEtcd runs an embedded etcd (fsync on) next to a bbolt file and
// measures one refresh's storage work on each, loading conns connections
// from each, and a herd of herdN callers split across two replicas on etcd
// against the same herd on one bbolt-backed server.
func benchEtcd(dir string, conns, samples, herdN, runs int, latency time.Duration, logf func(string, ...any)) (*etcdResult, error) {
	ctx := context.Background()
	endpoint, stop, err := etcdtest.Run(mkdir(dir, "etcd"))
	if err != nil {
		return nil, err
	}
	defer stop()
	keys, err := storage.NewKeyring(make([]byte, 32))
	if err != nil {
		return nil, err
	}
	bst, err := bolt.Open(filepath.Join(dir, "bolt.db"), bolt.Options{Keyring: keys})
	if err != nil {
		return nil, err
	}
	defer bst.Close()
	cli, err := etcdtest.NewClient(endpoint)
	if err != nil {
		return nil, err
	}
	defer cli.Close()
	// Its own prefix, so that the herd's replicas below do not load these.
	ets, err := etcd.Open(ctx, etcd.Options{Client: cli, Keyring: keys, Prefix: "/bench-load/"})
	if err != nil {
		return nil, err
	}
	defer ets.Close()
	t0 := time.Now()
	if err := populateStore(bst, conns); err != nil {
		return nil, err
	}
	if err := populateStore(ets, conns); err != nil {
		return nil, err
	}
	logf("etcd: %d connections written to bbolt and etcd in %v", conns, time.Since(t0).Round(time.Millisecond))
	res := &etcdResult{conns: conns, samples: samples, herdN: herdN, runs: runs, latency: latency}

	tok, err := bst.GetTokens(ctx, "tenants/t000000/connections/erp")
	if err != nil {
		return nil, err
	}
	intent := tok.Clone()
	intent.IntentGeneration, intent.IntentGrant, intent.IntentTime = tok.Generation, "refresh_token", time.Now()
	var onBolt, onEtcd []time.Duration
	for i := range samples {
		name := fmt.Sprintf("tenants/t%06d/connections/erp", (i*7919)%conns)
		t0 := time.Now()
		if err := bst.PutTokens(ctx, name, intent); err != nil {
			return nil, err
		}
		if err := bst.PutTokens(ctx, name, tok); err != nil {
			return nil, err
		}
		onBolt = append(onBolt, time.Since(t0))
		t0 = time.Now()
		unlock, err := ets.Lock(ctx, name)
		if err != nil {
			return nil, err
		}
		if _, err := ets.GetTokens(ctx, name); err != nil {
			return nil, err
		}
		if err := ets.PutTokens(ctx, name, intent); err != nil {
			return nil, err
		}
		if err := ets.PutTokens(ctx, name, tok); err != nil {
			return nil, err
		}
		unlock()
		onEtcd = append(onEtcd, time.Since(t0))
	}
	slices.Sort(onBolt)
	slices.Sort(onEtcd)
	res.boltP50, res.boltP99 = onBolt[len(onBolt)/2], onBolt[len(onBolt)*99/100]
	res.etcdP50, res.etcdP99 = onEtcd[len(onEtcd)/2], onEtcd[len(onEtcd)*99/100]

	var loadB, loadE []time.Duration
	for range 3 {
		for _, st := range []struct {
			s   stackStore
			out *[]time.Duration
		}{{bst, &loadB}, {ets, &loadE}} {
			var n atomic.Int64
			t0 := time.Now()
			if err := st.s.LoadAll(ctx, func(*storage.Connection, *storage.Tokens) error { n.Add(1); return nil }); err != nil {
				return nil, err
			}
			*st.out = append(*st.out, time.Since(t0))
			if int(n.Load()) != conns {
				return nil, fmt.Errorf("etcd: LoadAll gave %d of %d connections", n.Load(), conns)
			}
		}
	}
	res.loadBolt, res.loadEtcd = medianDur(loadB), medianDur(loadE)

	if err := res.herds(dir, endpoint, logf); err != nil {
		return nil, err
	}
	return res, nil
}

// herds releases herdN callers at once on an expired token: split across
// two replicas on etcd, and on one server with a bbolt file; runs of each
// interleaved.
func (res *etcdResult) herds(dir, endpoint string, logf func(string, ...any)) error {
	ctx := context.Background()
	clk := &clock{t: time.Now()}
	a, err := newStack(stackOptions{dir: mkdir(dir, "replica-a"), now: clk.Now, latency: res.latency, conns: 8, etcd: endpoint})
	if err != nil {
		return err
	}
	defer a.close()
	b, err := newStack(stackOptions{dir: mkdir(dir, "replica-b"), now: clk.Now, latency: res.latency, conns: 8, etcd: endpoint})
	if err != nil {
		return err
	}
	defer b.close()
	single, err := newStack(stackOptions{dir: mkdir(dir, "single"), now: clk.Now, latency: res.latency, conns: 16})
	if err != nil {
		return err
	}
	defer single.close()
	names, err := a.createConnections(ctx, 1)
	if err != nil {
		return err
	}
	if _, err := single.createConnections(ctx, 1); err != nil {
		return err
	}
	req := &pb.GetAccessTokenRequest{Name: names[0]}
	// Replica b learns of the connection through its watch.
	for deadline := time.Now().Add(10 * time.Second); ; time.Sleep(10 * time.Millisecond) {
		if _, err := b.client(0).GetAccessToken(ctx, req); err == nil {
			break
		} else if time.Now().After(deadline) {
			return fmt.Errorf("etcd: replica b never served the connection: %w", err)
		}
	}
	tokens := make([]string, res.herdN)
	var onEtcd, onBolt []time.Duration
	for range res.runs {
		d, calls, failed, distinct, err := herdOnce(clk, a.idp, tokens, func() (time.Duration, error) {
			return release(res.herdN, func(i int) error {
				s := a
				if i%2 == 1 {
					s = b
				}
				r, err := s.client(i).GetAccessToken(ctx, req)
				tokens[i] = r.GetAccessToken()
				return err
			})
		})
		if err != nil {
			return fmt.Errorf("etcd herd: %w", err)
		}
		res.herdCalls, res.herdFailed = append(res.herdCalls, calls), res.herdFailed+failed
		res.herdDistinct = max(res.herdDistinct, distinct)
		onEtcd = append(onEtcd, d)
		d, _, failed, _, err = herdOnce(clk, single.idp, tokens, func() (time.Duration, error) {
			return release(res.herdN, func(i int) error {
				r, err := single.client(i).GetAccessToken(ctx, req)
				tokens[i] = r.GetAccessToken()
				return err
			})
		})
		if err != nil || failed > 0 {
			return fmt.Errorf("bbolt herd: %d callers failed: %v", failed, err)
		}
		onBolt = append(onBolt, d)
	}
	res.herdEtcd, res.herdBolt = medianDur(onEtcd), medianDur(onBolt)
	logf("etcd: herd of %d across two replicas: upstream calls %v, %v (one bbolt server: %v)", res.herdN, res.herdCalls, res.herdEtcd, res.herdBolt)
	if res.herdFailed > 0 {
		return fmt.Errorf("etcd herd: %d callers failed", res.herdFailed)
	}
	return nil
}

// herdOnce lets the token expire (clk), runs run, and reports the upstream
// token requests idp saw meanwhile, how many callers got no token (tokens
// holds each caller's) and how many distinct tokens were handed out.
func herdOnce(clk *clock, idp *acumaticatest.Server, tokens []string, run func() (time.Duration, error)) (d time.Duration, calls, failed, distinct int, err error) {
	clear(tokens)
	clk.Advance(2 * time.Hour)
	before := idp.Counts()
	d, err = run()
	after := idp.Counts()
	calls = (after.RefreshGrants + after.PasswordGrants) - (before.RefreshGrants + before.PasswordGrants)
	seen := map[string]bool{}
	for _, t := range tokens {
		if t == "" {
			failed++
		}
		seen[t] = true
	}
	return d, calls, failed, len(seen), err
}
