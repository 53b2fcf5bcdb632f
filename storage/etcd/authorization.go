package etcd

import (
	"context"
	"time"

	clientv3 "go.etcd.io/etcd/client/v3"

	"tokenbroker/storage"
)

// Pending authorizations are kept in the cluster so that any replica can
// complete one that another started: each under the hash of its state,
// with a lease that removes it once it can no longer be completed.

func (s *Store) authorizationKey(key string) string { return s.prefix + "authorizations/" + key }

// PutAuthorization stores a pending authorization under key until its
// ExpireTime (then etcd removes it).
func (s *Store) PutAuthorization(ctx context.Context, key string, a *storage.Authorization) error {
	v, err := s.codec.EncodeAuthorization(key, a)
	if err != nil {
		return err
	}
	ttl := int64(time.Until(a.ExpireTime)/time.Second) + 60
	lease, err := s.cli.Grant(ctx, min(max(ttl, 60), 24*3600))
	if err != nil {
		return etcdErr(err)
	}
	if _, err := s.cli.Put(ctx, s.authorizationKey(key), string(v), clientv3.WithLease(lease.ID)); err != nil {
		return etcdErr(err)
	}
	return nil
}

// TakeAuthorization removes and returns the pending authorization stored
// under key, or [storage.ErrNotFound]. Removing and reading are one
// operation, so of replicas taking the same key at once only one gets it.
func (s *Store) TakeAuthorization(ctx context.Context, key string) (*storage.Authorization, error) {
	resp, err := s.cli.Delete(ctx, s.authorizationKey(key), clientv3.WithPrevKV())
	if err != nil {
		return nil, etcdErr(err)
	}
	if resp.Deleted == 0 || len(resp.PrevKvs) == 0 {
		return nil, storage.ErrNotFound
	}
	return s.codec.DecodeAuthorization(key, resp.PrevKvs[0].Value)
}
