package main

import (
	"context"
	"errors"
	"fmt"
	"time"

	pb "tokenbroker/gen/tokenbroker/v1"

	"tokenbroker/broker/acumaticatest"
	"tokenbroker/storage"
	"tokenbroker/storage/etcdtest"
)

// EtcdResult is what running as replicas on etcd costs, against one
// process on a bbolt file, measured in the same run on the same disk.
type EtcdResult struct {
	Samples int `json:"refresh_samples"`
	// One refresh's storage work: on bbolt the intent and the commit; on
	// etcd also the cluster lock and the re-read under it.
	BoltP50MS  float64 `json:"refresh_storage_bolt_p50_ms"`
	BoltP99MS  float64 `json:"refresh_storage_bolt_p99_ms"`
	EtcdP50MS  float64 `json:"refresh_storage_etcd_p50_ms"`
	EtcdP99MS  float64 `json:"refresh_storage_etcd_p99_ms"`
	HerdN      int     `json:"herd_callers"`
	Herds      int     `json:"herds"`
	LatencyMS  float64 `json:"upstream_latency_ms"`
	HerdCalls  []int   `json:"upstream_calls_per_herd"` // across both replicas
	HerdEtcdMS float64 `json:"herd_etcd_ms"`
	HerdBoltMS float64 `json:"herd_bolt_ms"`
}

func (e *EtcdResult) targets() []Target {
	one := 0
	for _, c := range e.HerdCalls {
		if c == 1 {
			one++
		}
	}
	return []Target{{Section: "etcd", Name: "herds across two etcd replicas with exactly one upstream token request", Unit: "herds",
		Measured: float64(one), Op: "==", Limit: float64(len(e.HerdCalls))}}
}

// benchEtcd runs an embedded etcd (fsync on) and times one refresh's
// storage work on a replica's store against a bbolt-backed server's on the
// same disk, then a herd of herdN callers split across two replicas on
// etcd against the same herd on one bbolt-backed server.
func benchEtcd(dir string, samples, herdN, runs int, latency time.Duration, logf func(string, ...any)) (*EtcdResult, error) {
	endpoint, stop, err := etcdtest.Run(mkdir(dir, "etcd"))
	if err != nil {
		return nil, err
	}
	defer stop()
	res := &EtcdResult{Samples: samples, HerdN: herdN, Herds: runs, LatencyMS: ms(latency)}
	clk := &clock{t: time.Now()}
	a, err := newStack(stackOptions{dir: mkdir(dir, "replica-a"), now: clk.Now, latency: latency, conns: 8, etcd: endpoint})
	if err != nil {
		return nil, err
	}
	defer a.close()
	b, err := newStack(stackOptions{dir: mkdir(dir, "replica-b"), now: clk.Now, latency: latency, conns: 8, etcd: endpoint})
	if err != nil {
		return nil, err
	}
	defer b.close()
	single, err := newStack(stackOptions{dir: mkdir(dir, "single"), now: clk.Now, latency: latency, conns: 16})
	if err != nil {
		return nil, err
	}
	defer single.close()
	names, err := a.createConnections(context.Background(), 1)
	if err != nil {
		return nil, err
	}
	if _, err := single.createConnections(context.Background(), 1); err != nil {
		return nil, err
	}
	if err := res.storageWork(single.store, a.store.(*storage.EtcdStore), names[0]); err != nil {
		return nil, err
	}
	return res, res.herds(clk, a, b, single, names[0], logf)
}

// storageWork times samples refreshes' storage work on each store,
// alternating: on bbolt the intent and the commit of the rotated token;
// on etcd also the cluster lock and the re-read of the token state.
func (res *EtcdResult) storageWork(bolt stackStore, ets *storage.EtcdStore, name string) error {
	ctx := context.Background()
	tok, err := bolt.GetTokens(ctx, name)
	if err != nil {
		return err
	}
	intent := tok.Clone()
	intent.IntentGeneration, intent.IntentGrant, intent.IntentTime = tok.Generation, "refresh_token", time.Now()
	var onBolt, onEtcd []time.Duration
	for range res.Samples {
		t0 := time.Now()
		if err := errors.Join(bolt.PutTokens(ctx, name, intent), bolt.PutTokens(ctx, name, tok)); err != nil {
			return err
		}
		onBolt = append(onBolt, time.Since(t0))
		t0 = time.Now()
		unlock, err := ets.Lock(ctx, name)
		if err != nil {
			return err
		}
		_, err = ets.GetTokens(ctx, name)
		if err := errors.Join(err, ets.PutTokens(ctx, name, intent), ets.PutTokens(ctx, name, tok)); err != nil {
			return err
		}
		unlock()
		onEtcd = append(onEtcd, time.Since(t0))
	}
	b50, b99 := percentiles(onBolt)
	e50, e99 := percentiles(onEtcd)
	res.BoltP50MS, res.BoltP99MS, res.EtcdP50MS, res.EtcdP99MS = ms(b50), ms(b99), ms(e50), ms(e99)
	return nil
}

// herds releases herdN callers at once on an expired token: split across
// two replicas on etcd, and on one server with a bbolt file; runs of each
// interleaved.
func (res *EtcdResult) herds(clk *clock, a, b, single *stack, name string, logf func(string, ...any)) error {
	ctx := context.Background()
	req := &pb.GetAccessTokenRequest{Name: name}
	// Replica b learns of the connection through its watch.
	for deadline := time.Now().Add(10 * time.Second); ; time.Sleep(10 * time.Millisecond) {
		if _, err := b.client(0).GetAccessToken(ctx, req); err == nil {
			break
		} else if time.Now().After(deadline) {
			return fmt.Errorf("etcd: replica b never served the connection: %w", err)
		}
	}
	tokens := make([]string, res.HerdN)
	herd := func(idp *acumaticatest.Server, stacks ...*stack) (time.Duration, int, error) {
		d, calls, failed, distinct, err := herdOnce(clk, idp, tokens, func() (time.Duration, error) {
			return release(res.HerdN, func(i int) error {
				r, err := stacks[i%len(stacks)].client(i).GetAccessToken(ctx, req)
				tokens[i] = r.GetAccessToken()
				return err
			})
		})
		if err == nil && (failed > 0 || distinct > 1) {
			err = fmt.Errorf("%d callers got no token, %d distinct tokens", failed, distinct)
		}
		return d, calls, err
	}
	var onEtcd, onBolt []time.Duration
	for range res.Herds {
		d, calls, err := herd(a.idp, a, b)
		if err != nil {
			return fmt.Errorf("etcd herd: %w", err)
		}
		res.HerdCalls, onEtcd = append(res.HerdCalls, calls), append(onEtcd, d)
		if d, _, err = herd(single.idp, single); err != nil {
			return fmt.Errorf("bbolt herd: %w", err)
		}
		onBolt = append(onBolt, d)
	}
	res.HerdEtcdMS, res.HerdBoltMS = ms(medianDur(onEtcd)), ms(medianDur(onBolt))
	logf("etcd: herd of %d across two replicas: upstream calls %v, %.1f ms (one bbolt server: %.1f ms)", res.HerdN, res.HerdCalls, res.HerdEtcdMS, res.HerdBoltMS)
	return nil
}
