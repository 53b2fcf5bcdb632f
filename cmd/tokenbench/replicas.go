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
	// One refresh's storage work: on bbolt the intent and the commit; on
	// etcd also the cluster lock and the re-read under it.
	Samples                                    int
	BoltP50MS, BoltP99MS, EtcdP50MS, EtcdP99MS float64
	HerdN, Herds                               int
	LatencyMS                                  float64
	HerdCalls                                  []int // per herd, across both replicas
	HerdEtcdMS, HerdBoltMS                     float64
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
func benchEtcd(dir string, samples, herdN, runs int, latency time.Duration, logf func(string, ...any)) *EtcdResult {
	endpoint, stop, err := etcdtest.Run(mkdir(dir, "etcd"))
	check(err)
	defer stop()
	res := &EtcdResult{Samples: samples, HerdN: herdN, Herds: runs, LatencyMS: ms(latency)}
	clk := &clock{t: time.Now()}
	a := newStack(stackOptions{dir: mkdir(dir, "replica-a"), now: clk.Now, latency: latency, conns: 8, etcd: endpoint})
	defer a.close()
	b := newStack(stackOptions{dir: mkdir(dir, "replica-b"), now: clk.Now, latency: latency, conns: 8, etcd: endpoint})
	defer b.close()
	single := newStack(stackOptions{dir: mkdir(dir, "single"), now: clk.Now, latency: latency, conns: 16})
	defer single.close()
	name := a.createConnections(1)[0]
	single.createConnections(1)
	res.storageWork(single.store, a.store.(*storage.EtcdStore), name)
	res.herds(clk, a, b, single, name)
	logf("etcd: herd of %d across two replicas: upstream calls %v, %.1f ms (one bbolt server: %.1f ms)", res.HerdN, res.HerdCalls, res.HerdEtcdMS, res.HerdBoltMS)
	return res
}

// storageWork times samples refreshes' storage work on each store,
// alternating: on bbolt the intent and the commit of the rotated token;
// on etcd also the cluster lock and the re-read of the token state.
func (res *EtcdResult) storageWork(bolt stackStore, ets *storage.EtcdStore, name string) {
	ctx := context.Background()
	tok := must(bolt.GetTokens(ctx, name))
	intent := tok.Clone()
	intent.IntentGeneration, intent.IntentGrant, intent.IntentTime = tok.Generation, "refresh_token", time.Now()
	var onBolt, onEtcd []time.Duration
	for range res.Samples {
		t0 := time.Now()
		check(errors.Join(bolt.PutTokens(ctx, name, intent), bolt.PutTokens(ctx, name, tok)))
		onBolt = append(onBolt, time.Since(t0))
		t0 = time.Now()
		unlock := must(ets.Lock(ctx, name))
		check(errors.Join(errOf(ets.GetTokens(ctx, name)), ets.PutTokens(ctx, name, intent), ets.PutTokens(ctx, name, tok)))
		unlock()
		onEtcd = append(onEtcd, time.Since(t0))
	}
	b50, b99 := percentiles(onBolt)
	e50, e99 := percentiles(onEtcd)
	res.BoltP50MS, res.BoltP99MS, res.EtcdP50MS, res.EtcdP99MS = ms(b50), ms(b99), ms(e50), ms(e99)
}

// herds releases herdN callers at once on an expired token: split across
// two replicas on etcd, and on one server with a bbolt file; runs of each
// interleaved.
func (res *EtcdResult) herds(clk *clock, a, b, single *stack, name string) {
	ctx := context.Background()
	req := &pb.GetAccessTokenRequest{Name: name}
	// Replica b learns of the connection through its watch.
	for deadline := time.Now().Add(10 * time.Second); ; time.Sleep(10 * time.Millisecond) {
		if _, err := b.client(0).GetAccessToken(ctx, req); err == nil {
			break
		} else if time.Now().After(deadline) {
			check(fmt.Errorf("etcd: replica b never served the connection: %w", err))
		}
	}
	herd := func(idp *acumaticatest.Server, stacks ...*stack) (time.Duration, int) {
		get := func(i int) (string, error) {
			r, err := stacks[i%len(stacks)].client(i).GetAccessToken(ctx, req)
			return r.GetAccessToken(), err
		}
		return herdOnce(clk, idp, res.HerdN, get, func(call func(int) error) (time.Duration, error) { return release(res.HerdN, call) })
	}
	var onEtcd, onBolt []time.Duration
	for range res.Herds {
		d, calls := herd(a.idp, a, b)
		res.HerdCalls, onEtcd = append(res.HerdCalls, calls), append(onEtcd, d)
		d, _ = herd(single.idp, single)
		onBolt = append(onBolt, d)
	}
	res.HerdEtcdMS, res.HerdBoltMS = ms(medianDur(onEtcd)), ms(medianDur(onBolt))
}
