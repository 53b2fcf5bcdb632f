package main

import (
	"context"
	"crypto/tls"
	"crypto/x509"
	"errors"
	"fmt"
	"log/slog"
	"os"
	"strings"
	"time"

	clientv3 "go.etcd.io/etcd/client/v3"
	"google.golang.org/grpc/health"
	healthpb "google.golang.org/grpc/health/grpc_health_v1"

	"tokenbroker/broker"
	pb "tokenbroker/gen/tokenbroker/v1"
	"tokenbroker/server"
	"tokenbroker/storage"
	"tokenbroker/storage/bolt"
	"tokenbroker/storage/etcd"
)

// Compile-time checks: both stores serve the broker.
var (
	_ broker.Store   = (*bolt.Store)(nil)
	_ broker.Store   = (*etcd.Store)(nil)
	_ broker.Locker  = (*etcd.Store)(nil)
	_ broker.Watcher = (*etcd.Store)(nil)

	_ broker.AuthorizationStore = (*etcd.Store)(nil)
)

// openedStore is the configured store with what it offers the broker.
type openedStore struct {
	store   broker.Store
	locker  broker.Locker
	watcher broker.Watcher
	admin   server.AdminStore // backup, rekey, key status
	// authorizations keeps pending authorizations for every replica; nil
	// (this process's memory) with bbolt.
	authorizations broker.AuthorizationStore
	// healthy says why the store cannot keep writes, or nil; nil when the
	// store cannot tell (etcd).
	healthy func() error
	close   func()
}

func openStore(ctx context.Context, cfg *config, dbPath string, keys *storage.Keyring, log *slog.Logger) (*openedStore, error) {
	if cfg.etcdEndpoints == "" {
		st, err := bolt.Open(dbPath, bolt.Options{Keyring: keys, Populate: true})
		if err != nil {
			return nil, err
		}
		logUpgrade(log, st.Upgraded(), keys)
		if err := logOldKeys(ctx, log, st, keys); err != nil {
			st.Close()
			return nil, err
		}
		return &openedStore{store: st, admin: st, healthy: st.Healthy, close: func() { st.Close() }}, nil
	}
	cli, err := newEtcdClient(cfg)
	if err != nil {
		return nil, err
	}
	octx, cancel := context.WithTimeout(ctx, 15*time.Second)
	defer cancel()
	st, err := etcd.Open(octx, etcd.Options{Client: cli, Keyring: keys, Prefix: cfg.etcdPrefix})
	if err != nil {
		cli.Close()
		return nil, err
	}
	logUpgrade(log, st.Upgraded(), keys)
	if err := logOldKeys(octx, log, st, keys); err != nil {
		st.Close()
		cli.Close()
		return nil, err
	}
	return &openedStore{store: st, locker: st, watcher: st, authorizations: st, admin: st, close: func() { st.Close(); cli.Close() }}, nil
}

// newEtcdClient connects to --etcd-endpoints with the --etcd-* TLS files.
func newEtcdClient(cfg *config) (*clientv3.Client, error) {
	ccfg := clientv3.Config{Endpoints: strings.Split(cfg.etcdEndpoints, ","), DialTimeout: 5 * time.Second}
	if cfg.etcdCA != "" || cfg.etcdCert != "" {
		tc := &tls.Config{MinVersion: tls.VersionTLS12}
		if cfg.etcdCA != "" {
			pem, err := os.ReadFile(cfg.etcdCA)
			if err != nil {
				return nil, fmt.Errorf("etcd ca: %w", err)
			}
			tc.RootCAs = x509.NewCertPool()
			if !tc.RootCAs.AppendCertsFromPEM(pem) {
				return nil, errors.New("etcd ca: no PEM certificates")
			}
		}
		if cfg.etcdCert != "" {
			cert, err := tls.LoadX509KeyPair(cfg.etcdCert, cfg.etcdKey)
			if err != nil {
				return nil, fmt.Errorf("etcd client certificate: %w", err)
			}
			tc.Certificates = []tls.Certificate{cert}
		}
		ccfg.TLS = tc
	}
	cli, err := clientv3.New(ccfg)
	if err != nil {
		return nil, fmt.Errorf("etcd: %w", err)
	}
	return cli, nil
}

// logUpgrade reports the one-time upgrade of records written before every
// record was authenticated: they were taken as found, once.
func logUpgrade(log *slog.Logger, n int, keys *storage.Keyring) {
	if n > 0 {
		log.Warn("upgraded the store's records to authenticated ones: they were trusted as found this once; from now on a record changed without the data key is refused",
			"records", n, "key_id", keys.PrimaryID())
	}
}

// logOldKeys reports, while the key file holds older keys, how many records
// still need one: the README's key rotation removes the old keys once this
// is 0.
func logOldKeys(ctx context.Context, log *slog.Logger, st interface {
	OldKeyRecords(context.Context) (int, error)
}, keys *storage.Keyring) error {
	if len(keys.IDs()) < 2 {
		return nil
	}
	n, err := st.OldKeyRecords(ctx)
	if err != nil {
		return err
	}
	log.Info("data key rotation", "key_id", keys.PrimaryID(), "key_ids", strings.Join(keys.IDs(), ","), "records_on_old_keys", n)
	return nil
}

// storeHealthInterval is how often watchHealth asks the store.
const storeHealthInterval = time.Second

// watchHealth mirrors the store's health on the server's health service
// until ctx ends: NOT_SERVING, with an error log, while the store cannot
// keep writes (its data file deleted or replaced, damaged, or refusing
// writes), SERVING again once it can.
func (o *openedStore) watchHealth(ctx context.Context, hs *health.Server, log *slog.Logger) {
	if o.healthy == nil {
		return
	}
	t := time.NewTicker(storeHealthInterval)
	defer t.Stop()
	var last error
	for {
		select {
		case <-ctx.Done():
			return
		case <-t.C:
		}
		err := o.healthy()
		switch {
		case err != nil && (last == nil || err.Error() != last.Error()):
			log.Error("data store cannot keep writes: health is NOT_SERVING until it can", "error", err.Error())
			setServing(hs, healthpb.HealthCheckResponse_NOT_SERVING)
		case err == nil && last != nil:
			log.Info("data store keeps writes again: health is SERVING")
			setServing(hs, healthpb.HealthCheckResponse_SERVING)
		}
		last = err
	}
}

// setServing sets the status of the whole server and of the API service.
func setServing(hs *health.Server, st healthpb.HealthCheckResponse_ServingStatus) {
	hs.SetServingStatus("", st)
	hs.SetServingStatus(pb.TokenBroker_ServiceDesc.ServiceName, st)
}
