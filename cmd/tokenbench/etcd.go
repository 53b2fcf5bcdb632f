package main

import (
	"context"
	"errors"
	"path/filepath"
	"time"

	"tokenbroker/storage"
	"tokenbroker/storage/bolt"
	"tokenbroker/storage/etcd"
	"tokenbroker/storage/etcdtest"
)

// EtcdResult is one refresh's storage work on a replica's etcd store
// against a bbolt file on the same disk, in milliseconds: on bbolt the
// intent and the commit of the rotated token; on etcd also the
// connection's cluster lock and the re-read of its token state under it.
type EtcdResult struct {
	Samples                                    int
	BoltP50MS, BoltP99MS, EtcdP50MS, EtcdP99MS float64
}

// benchEtcd runs an embedded etcd (fsync on) beside a bbolt file and times
// samples refreshes' storage work on each, alternating.
func benchEtcd(dir string, samples int) *EtcdResult {
	endpoint, stop, err := etcdtest.Run(mkdir(dir, "etcd"))
	check(err)
	defer stop()
	cli := must(etcdtest.NewClient(endpoint))
	defer cli.Close()
	keys := must(storage.NewKeyring(make([]byte, 32)))
	ets := must(etcd.Open(context.Background(), etcd.Options{Client: cli, Keyring: keys}))
	defer ets.Close()
	path := filepath.Join(dir, "bolt.db")
	populate(path, keys, 1)
	bst := must(bolt.Open(path, bolt.Options{Keyring: keys}))
	defer bst.Close()
	ctx, name := context.Background(), scaleName(0)
	tok := must(bst.GetTokens(ctx, name))
	check(errOf(ets.CreateConnection(ctx, must(bst.GetConnection(ctx, name)), tok)))
	intent := tok.Clone()
	intent.IntentGeneration, intent.IntentGrant, intent.IntentTime = tok.Generation, "refresh_token", time.Now()
	var onBolt, onEtcd []time.Duration
	for range samples {
		t0 := time.Now()
		check(errors.Join(bst.PutTokens(ctx, name, intent), bst.PutTokens(ctx, name, tok)))
		onBolt = append(onBolt, time.Since(t0))
		t0 = time.Now()
		unlock := must(ets.Lock(ctx, name))
		check(errors.Join(errOf(ets.GetTokens(ctx, name)), ets.PutTokens(ctx, name, intent), ets.PutTokens(ctx, name, tok)))
		unlock()
		onEtcd = append(onEtcd, time.Since(t0))
	}
	b50, b99 := percentiles(onBolt)
	e50, e99 := percentiles(onEtcd)
	return &EtcdResult{Samples: samples, BoltP50MS: ms(b50), BoltP99MS: ms(b99), EtcdP50MS: ms(e50), EtcdP99MS: ms(e99)}
}
