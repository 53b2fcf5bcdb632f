package main

import (
	"context"
	"crypto/tls"
	"crypto/x509"
	"errors"
	"fmt"
	"os"
	"strings"
	"time"

	clientv3 "go.etcd.io/etcd/client/v3"

	"tokenbroker/broker"
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
)

// openedStore is the configured store with what it offers the broker.
type openedStore struct {
	store   broker.Store
	locker  broker.Locker
	watcher broker.Watcher
	close   func()
}

func openStore(ctx context.Context, cfg *config, dbPath string, keys *storage.Keyring) (*openedStore, error) {
	if cfg.etcdEndpoints == "" {
		st, err := bolt.Open(dbPath, bolt.Options{Keyring: keys, Populate: true})
		if err != nil {
			return nil, err
		}
		return &openedStore{store: st, close: func() { st.Close() }}, nil
	}
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
	octx, cancel := context.WithTimeout(ctx, 15*time.Second)
	defer cancel()
	st, err := etcd.Open(octx, etcd.Options{Client: cli, Keyring: keys, Prefix: cfg.etcdPrefix})
	if err != nil {
		cli.Close()
		return nil, err
	}
	return &openedStore{store: st, locker: st, watcher: st, close: func() { st.Close(); cli.Close() }}, nil
}
