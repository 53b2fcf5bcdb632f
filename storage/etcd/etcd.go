package etcd

import (
	"context"
	"errors"
	"fmt"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"go.etcd.io/etcd/api/v3/mvccpb"
	"go.etcd.io/etcd/api/v3/v3rpc/rpctypes"
	clientv3 "go.etcd.io/etcd/client/v3"
	"go.etcd.io/etcd/client/v3/concurrency"

	"tokenbroker/storage"
)

// Options configure [Open]. Zero fields mean the documented defaults.
type Options struct {
	// Client talks to the etcd cluster. Required; the caller closes it.
	Client *clientv3.Client
	// Keyring seals secrets and tokens. Required.
	Keyring *storage.Keyring
	// Prefix namespaces every key. Default "/tokenbroker/".
	Prefix string
	// SessionTTL is the lease behind this replica's locks: if the replica
	// dies, its locks are released after this long. Default 10 s.
	SessionTTL time.Duration
	// Now returns the current time. Default time.Now.
	Now func() time.Time
}

// Store keeps connections in etcd, for running several replicas. It has
// the same methods and semantics as the bbolt store (a write returns once
// the cluster has committed it), plus [Store.Lock] to serialize a
// connection's upstream calls across replicas and [Store.Watch] to keep
// replicas' caches coherent.
type Store struct {
	cli    *clientv3.Client
	codec  *storage.Codec
	prefix string
	ttl    int // session lease TTL, seconds

	sessMu    sync.Mutex
	session   *concurrency.Session // replaced when its lease lapses; see lockSession
	closed    bool
	loadedRev atomic.Int64 // revision of the last LoadAll; Watch continues after it
	// held maps a connection name to the lock this replica holds on it
	// (see [Store.Lock]); token writes for that name are fenced by it.
	held sync.Map
}

// pageSize bounds one etcd range read (etcd caps response sizes).
const pageSize = 200

// Open checks (or initializes) the cluster's tokenbroker meta record and
// opens a session for locks. A wrong key fails with [storage.ErrWrongKey].
func Open(ctx context.Context, opts Options) (*Store, error) {
	if opts.Client == nil || opts.Keyring == nil {
		return nil, errors.New("storage: etcd: Options.Client and Keyring are required")
	}
	if opts.Prefix == "" {
		opts.Prefix = "/tokenbroker/"
	}
	if !strings.HasSuffix(opts.Prefix, "/") {
		opts.Prefix += "/"
	}
	if opts.SessionTTL <= 0 {
		opts.SessionTTL = 10 * time.Second
	}
	if opts.Now == nil {
		opts.Now = time.Now
	}
	s := &Store{cli: opts.Client, codec: storage.NewCodec(opts.Keyring), prefix: opts.Prefix}
	mv, err := s.codec.EncodeMeta(opts.Now())
	if err != nil {
		return nil, err
	}
	mkey := s.prefix + "meta"
	resp, err := s.cli.Txn(ctx).
		If(clientv3.Compare(clientv3.CreateRevision(mkey), "=", 0)).
		Then(clientv3.OpPut(mkey, string(mv))).
		Else(clientv3.OpGet(mkey)).Commit()
	if err != nil {
		return nil, fmt.Errorf("storage: etcd: %w", err)
	}
	if !resp.Succeeded {
		kvs := resp.Responses[0].GetResponseRange().GetKvs()
		if len(kvs) == 0 {
			return nil, fmt.Errorf("%w: etcd meta record vanished", storage.ErrNotDataFile)
		}
		if err := s.codec.CheckMeta("etcd prefix "+s.prefix, kvs[0].Value); err != nil {
			return nil, err
		}
	}
	s.ttl = int(opts.SessionTTL / time.Second)
	s.session, err = concurrency.NewSession(s.cli, concurrency.WithTTL(s.ttl))
	if err != nil {
		return nil, fmt.Errorf("storage: etcd session: %w", err)
	}
	return s, nil
}

// lockSession returns the session to take locks under. A session whose
// lease lapsed (etcd unreachable for longer than its TTL, or the lease
// revoked) is dead for good, so a new one is granted, bounded by ctx: the
// replica takes locks again once etcd is back instead of failing every
// refresh until it restarts.
//
// etcd may report the lease gone before the session notices; stale, when
// set, is a session a lock attempt found so, and is replaced too.
func (s *Store) lockSession(ctx context.Context, stale *concurrency.Session) (*concurrency.Session, error) {
	s.sessMu.Lock()
	defer s.sessMu.Unlock()
	if s.closed {
		return nil, storage.ErrClosed
	}
	if s.session != stale {
		select {
		case <-s.session.Done():
		default:
			return s.session, nil
		}
	}
	s.session.Orphan()
	lease, err := s.cli.Grant(ctx, int64(s.ttl))
	if err != nil {
		return nil, etcdErr(err)
	}
	sess, err := concurrency.NewSession(s.cli, concurrency.WithLease(lease.ID), concurrency.WithTTL(s.ttl))
	if err != nil {
		return nil, fmt.Errorf("storage: etcd session: %w", err)
	}
	s.session = sess
	return sess, nil
}

// Close releases this replica's session (and with it its locks). It does
// not close the client.
func (s *Store) Close() error {
	s.sessMu.Lock()
	defer s.sessMu.Unlock()
	s.closed = true
	return s.session.Close()
}

func (s *Store) connKey(name string) string  { return s.prefix + "connections/" + name }
func (s *Store) tokenKey(name string) string { return s.prefix + "tokens/" + name }

func etcdErr(err error) error { return fmt.Errorf("storage: etcd: %w", err) }

// CreateConnection stores a new connection with its initial token state.
func (s *Store) CreateConnection(ctx context.Context, c *storage.Connection, t *storage.Tokens) (*storage.Connection, error) {
	if t == nil {
		t = &storage.Tokens{}
	}
	c, cv, tv, err := s.codec.EncodeRecords(c, 1, t)
	if err != nil {
		return nil, err
	}
	ck := s.connKey(c.Name)
	resp, err := s.cli.Txn(ctx).
		If(clientv3.Compare(clientv3.CreateRevision(ck), "=", 0)).
		Then(clientv3.OpPut(ck, string(cv)), clientv3.OpPut(s.tokenKey(c.Name), string(tv))).Commit()
	if err != nil {
		return nil, etcdErr(err)
	}
	if !resp.Succeeded {
		return nil, fmt.Errorf("%w: %s", storage.ErrAlreadyExists, c.Name)
	}
	return c, nil
}

func (s *Store) get(ctx context.Context, key string) ([]byte, int64, error) {
	resp, err := s.cli.Get(ctx, key)
	if err != nil {
		return nil, 0, etcdErr(err)
	}
	if len(resp.Kvs) == 0 {
		return nil, 0, storage.ErrNotFound
	}
	return resp.Kvs[0].Value, resp.Kvs[0].ModRevision, nil
}

func (s *Store) decodeConnection(name string, v []byte) (*storage.Connection, error) {
	return s.codec.DecodeConnection(name, v)
}

func (s *Store) decodeTokens(name string, v []byte) (*storage.Tokens, error) {
	return s.codec.DecodeTokens(name, v)
}

// GetConnection reads one connection.
func (s *Store) GetConnection(ctx context.Context, name string) (*storage.Connection, error) {
	v, _, err := s.get(ctx, s.connKey(name))
	if errors.Is(err, storage.ErrNotFound) {
		return nil, fmt.Errorf("%w: %s", storage.ErrNotFound, name)
	}
	if err != nil {
		return nil, err
	}
	return s.decodeConnection(name, v)
}

// GetTokens reads a connection's token state.
func (s *Store) GetTokens(ctx context.Context, name string) (*storage.Tokens, error) {
	v, _, err := s.get(ctx, s.tokenKey(name))
	if errors.Is(err, storage.ErrNotFound) {
		return nil, fmt.Errorf("%w: %s", storage.ErrNotFound, name)
	}
	if err != nil {
		return nil, err
	}
	return s.decodeTokens(name, v)
}

// ListConnections returns up to limit connections whose names start with
// prefix and sort after the name after, in name order.
func (s *Store) ListConnections(ctx context.Context, prefix, after string, limit int) ([]*storage.Connection, error) {
	base := s.prefix + "connections/"
	start := base + prefix
	if after >= prefix && after != "" {
		start = base + after + "\x00"
	}
	resp, err := s.cli.Get(ctx, start, clientv3.WithRange(clientv3.GetPrefixRangeEnd(base+prefix)), clientv3.WithLimit(int64(limit)))
	if err != nil {
		return nil, etcdErr(err)
	}
	var out []*storage.Connection
	for _, kv := range resp.Kvs {
		c, err := s.decodeConnection(strings.TrimPrefix(string(kv.Key), base), kv.Value)
		if err != nil {
			return nil, err
		}
		out = append(out, c)
	}
	return out, nil
}

// UpdateConnection replaces a connection whose stored Revision equals
// c.Revision, and its token state when t is not nil.
func (s *Store) UpdateConnection(ctx context.Context, c *storage.Connection, t *storage.Tokens) (*storage.Connection, error) {
	ck := s.connKey(c.Name)
	v, modRev, err := s.get(ctx, ck)
	if errors.Is(err, storage.ErrNotFound) {
		return nil, fmt.Errorf("%w: %s", storage.ErrNotFound, c.Name)
	}
	if err != nil {
		return nil, err
	}
	rev, err := storage.Revision(v)
	if err != nil {
		return nil, err
	}
	if rev != c.Revision {
		return nil, fmt.Errorf("%w: %s is at revision %d, not %d", storage.ErrConflict, c.Name, rev, c.Revision)
	}
	next, cv, tv, err := s.codec.EncodeRecords(c, c.Revision+1, t)
	if err != nil {
		return nil, err
	}
	ops := []clientv3.Op{clientv3.OpPut(ck, string(cv))}
	conds := []clientv3.Cmp{clientv3.Compare(clientv3.ModRevision(ck), "=", modRev)}
	fence, fenced := s.fence(c.Name)
	if tv != nil {
		ops = append(ops, clientv3.OpPut(s.tokenKey(c.Name), string(tv)))
		if fenced {
			conds = append(conds, fence)
		}
	}
	resp, err := s.cli.Txn(ctx).If(conds...).Then(ops...).Else(clientv3.OpGet(ck, clientv3.WithKeysOnly())).Commit()
	if err != nil {
		return nil, etcdErr(err)
	}
	if !resp.Succeeded {
		if kvs := resp.Responses[0].GetResponseRange().GetKvs(); tv != nil && fenced && len(kvs) == 1 && kvs[0].ModRevision == modRev {
			return nil, fmt.Errorf("%w: %s", storage.ErrLockLost, c.Name)
		}
		return nil, fmt.Errorf("%w: %s changed concurrently", storage.ErrConflict, c.Name)
	}
	return next, nil
}

// DeleteConnection erases a connection and its tokens. A revision other than
// 0 must match the stored one.
func (s *Store) DeleteConnection(ctx context.Context, name string, revision int64) error {
	ck := s.connKey(name)
	v, modRev, err := s.get(ctx, ck)
	if errors.Is(err, storage.ErrNotFound) {
		return fmt.Errorf("%w: %s", storage.ErrNotFound, name)
	}
	if err != nil {
		return err
	}
	if revision != 0 {
		rev, err := storage.Revision(v)
		if err != nil {
			return err
		}
		if rev != revision {
			return fmt.Errorf("%w: %s is at revision %d, not %d", storage.ErrConflict, name, rev, revision)
		}
	}
	resp, err := s.cli.Txn(ctx).If(clientv3.Compare(clientv3.ModRevision(ck), "=", modRev)).
		Then(clientv3.OpDelete(ck), clientv3.OpDelete(s.tokenKey(name))).Commit()
	if err != nil {
		return etcdErr(err)
	}
	if !resp.Succeeded {
		return fmt.Errorf("%w: %s changed concurrently", storage.ErrConflict, name)
	}
	return nil
}

// PutTokens durably replaces a connection's token state; [storage.ErrNotFound] if
// the connection was deleted.
func (s *Store) PutTokens(ctx context.Context, name string, t *storage.Tokens) error {
	tv, err := s.codec.EncodeTokens(name, t)
	if err != nil {
		return err
	}
	ck := s.connKey(name)
	conds := []clientv3.Cmp{clientv3.Compare(clientv3.CreateRevision(ck), ">", 0)}
	fence, fenced := s.fence(name)
	if fenced {
		conds = append(conds, fence)
	}
	resp, err := s.cli.Txn(ctx).If(conds...).
		Then(clientv3.OpPut(s.tokenKey(name), string(tv))).
		Else(clientv3.OpGet(ck, clientv3.WithCountOnly())).Commit()
	if err != nil {
		return etcdErr(err)
	}
	if !resp.Succeeded {
		if fenced && resp.Responses[0].GetResponseRange().GetCount() > 0 {
			return fmt.Errorf("%w: %s", storage.ErrLockLost, name)
		}
		return fmt.Errorf("%w: %s", storage.ErrNotFound, name)
	}
	return nil
}

// fence returns, while this replica holds name's lock, the comparison that
// holds only as long as the lock is still this replica's. Token writes made
// under the lock carry it: if the lock's lease lapsed (a long pause, a
// partition from etcd) and another replica took the lock, the write fails
// with [storage.ErrLockLost] instead of overwriting what the other replica did.
func (s *Store) fence(name string) (clientv3.Cmp, bool) {
	v, ok := s.held.Load(name)
	if !ok {
		return clientv3.Cmp{}, false
	}
	return v.(*concurrency.Mutex).IsOwner(), true
}

// LoadAll calls fn for every connection with its token state, in name
// order, reading in pages at one etcd revision; [Store.Watch]
// continues from that revision.
func (s *Store) LoadAll(ctx context.Context, fn func(*storage.Connection, *storage.Tokens) error) error {
	rev, err := s.loadAll(ctx, fn)
	if err == nil {
		s.loadedRev.Store(rev)
	}
	return err
}

func (s *Store) loadAll(ctx context.Context, fn func(*storage.Connection, *storage.Tokens) error) (int64, error) {
	base := s.prefix + "connections/"
	key := base
	var rev int64
	for {
		opts := []clientv3.OpOption{clientv3.WithRange(clientv3.GetPrefixRangeEnd(base)), clientv3.WithLimit(pageSize)}
		if rev != 0 {
			opts = append(opts, clientv3.WithRev(rev))
		}
		resp, err := s.cli.Get(ctx, key, opts...)
		if err != nil {
			return 0, etcdErr(err)
		}
		if rev == 0 {
			rev = resp.Header.Revision
		}
		toks, err := s.tokensFor(ctx, resp.Kvs, base, rev)
		if err != nil {
			return 0, err
		}
		for _, kv := range resp.Kvs {
			name := strings.TrimPrefix(string(kv.Key), base)
			c, err := s.decodeConnection(name, kv.Value)
			if err != nil {
				return 0, err
			}
			t := &storage.Tokens{}
			if v, ok := toks[name]; ok {
				if t, err = s.decodeTokens(name, v); err != nil {
					return 0, err
				}
			}
			if err := fn(c, t); err != nil {
				return 0, err
			}
		}
		if !resp.More || len(resp.Kvs) == 0 {
			return rev, nil
		}
		key = string(resp.Kvs[len(resp.Kvs)-1].Key) + "\x00"
	}
}

// tokensFor reads, at rev, the token records of one page of connection
// keys (sorted, under base) with range reads over the same span of the
// tokens prefix: a page costs a few round trips, not one per connection.
func (s *Store) tokensFor(ctx context.Context, conns []*mvccpb.KeyValue, base string, rev int64) (map[string][]byte, error) {
	out := make(map[string][]byte, len(conns))
	if len(conns) == 0 {
		return out, nil
	}
	first := strings.TrimPrefix(string(conns[0].Key), base)
	last := strings.TrimPrefix(string(conns[len(conns)-1].Key), base)
	key, end := s.tokenKey(first), s.tokenKey(last)+"\x00"
	tbase := s.tokenKey("")
	for {
		resp, err := s.cli.Get(ctx, key, clientv3.WithRange(end), clientv3.WithRev(rev), clientv3.WithLimit(pageSize))
		if err != nil {
			return nil, etcdErr(err)
		}
		for _, kv := range resp.Kvs {
			out[strings.TrimPrefix(string(kv.Key), tbase)] = kv.Value
		}
		if !resp.More || len(resp.Kvs) == 0 {
			return out, nil
		}
		key = string(resp.Kvs[len(resp.Kvs)-1].Key) + "\x00"
	}
}

// Watch calls fn for every change made by any replica (this one's own
// writes included) after the last LoadAll, until ctx ends.
func (s *Store) Watch(ctx context.Context, fn func(storage.Change)) {
	base := s.prefix
	opts := []clientv3.OpOption{clientv3.WithPrefix()}
	if rev := s.loadedRev.Load(); rev > 0 {
		opts = append(opts, clientv3.WithRev(rev+1))
	}
	wc := s.cli.Watch(ctx, base+"connections/", opts...)
	wt := s.cli.Watch(ctx, base+"tokens/", opts...)
	for {
		select {
		case <-ctx.Done():
			return
		case resp, ok := <-wc:
			if !ok {
				return
			}
			for _, ev := range resp.Events {
				name := strings.TrimPrefix(string(ev.Kv.Key), base+"connections/")
				if ev.Type == clientv3.EventTypeDelete {
					fn(storage.Change{Name: name, Deleted: true})
					continue
				}
				if c, err := s.decodeConnection(name, ev.Kv.Value); err == nil {
					fn(storage.Change{Name: name, Connection: c})
				}
			}
		case resp, ok := <-wt:
			if !ok {
				return
			}
			for _, ev := range resp.Events {
				if ev.Type == clientv3.EventTypeDelete {
					continue
				}
				name := strings.TrimPrefix(string(ev.Kv.Key), base+"tokens/")
				if t, err := s.decodeTokens(name, ev.Kv.Value); err == nil {
					fn(storage.Change{Name: name, Tokens: t})
				}
			}
		}
	}
}

// Lock takes the cluster-wide lock of a connection: while it is held, no
// other replica talks to the connection's token endpoint. It is released by
// unlock, or by etcd when this replica's session lapses.
func (s *Store) Lock(ctx context.Context, name string) (unlock func(), err error) {
	sess, err := s.lockSession(ctx, nil)
	if err != nil {
		return nil, err
	}
	m := concurrency.NewMutex(sess, s.prefix+"locks/"+name)
	err = m.Lock(ctx)
	if errors.Is(err, rpctypes.ErrLeaseNotFound) {
		if sess, err = s.lockSession(ctx, sess); err != nil {
			return nil, err
		}
		m = concurrency.NewMutex(sess, s.prefix+"locks/"+name)
		err = m.Lock(ctx)
	}
	if err != nil {
		return nil, etcdErr(err)
	}
	s.held.Store(name, m)
	return func() {
		s.held.CompareAndDelete(name, m)
		ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
		defer cancel()
		m.Unlock(ctx)
	}, nil
}
