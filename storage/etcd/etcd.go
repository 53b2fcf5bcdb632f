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

	upgraded int              // records authenticated at open (format 1)
	now      func() time.Time // stamps a delete's mark

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
	s := &Store{cli: opts.Client, codec: storage.NewCodec(opts.Keyring), prefix: opts.Prefix, now: opts.Now}
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
		if err := s.bringUpToDate(ctx, kvs[0]); err != nil {
			return nil, err
		}
	}
	s.ttl = int(opts.SessionTTL / time.Second)
	s.session, err = concurrency.NewSession(s.cli, concurrency.WithTTL(s.ttl))
	if err != nil {
		return nil, fmt.Errorf("storage: etcd session: %w", err)
	}
	if err := s.announce(ctx, s.session.Lease()); err != nil {
		s.session.Close()
		return nil, err
	}
	return s, nil
}

// bringUpToDate checks the meta record and makes what it asks for: the
// records of a cluster written in format 1 are authenticated (trusted once,
// as that version trusted them), a canary sealed with an older key is
// sealed anew. Each record is rewritten only if unchanged since read; the
// meta record last, so an interrupted upgrade is redone at the next open.
func (s *Store) bringUpToDate(ctx context.Context, meta *mvccpb.KeyValue) error {
	st, err := s.codec.OpenMeta("etcd prefix "+s.prefix, meta.Value)
	if err != nil || !st.Reseal {
		return err
	}
	if st.Upgrade {
		n, err := s.upgradePrefix(ctx, s.prefix+"connections/", s.codec.UpgradeConnection)
		if err != nil {
			return err
		}
		m, err := s.upgradePrefix(ctx, s.prefix+"tokens/", s.codec.UpgradeTokens)
		if err != nil {
			return err
		}
		s.upgraded = n + m
	}
	mv, err := s.codec.ResealMeta(meta.Value)
	if err != nil {
		return err
	}
	_, err = s.cli.Txn(ctx).If(clientv3.Compare(clientv3.ModRevision(string(meta.Key)), "=", meta.ModRevision)).
		Then(clientv3.OpPut(string(meta.Key), string(mv))).Commit()
	if err != nil {
		return etcdErr(err)
	}
	return nil
}

// upgradePrefix rewrites every record under base with recode.
func (s *Store) upgradePrefix(ctx context.Context, base string, recode func(name string, v []byte) ([]byte, error)) (int, error) {
	n := 0
	_, err := s.eachPage(ctx, base, base, 0, func(kvs []*mvccpb.KeyValue, _ int64) error {
		for _, kv := range kvs {
			nv, err := recode(strings.TrimPrefix(string(kv.Key), base), kv.Value)
			if err != nil {
				return err
			}
			_, err = s.cli.Txn(ctx).If(clientv3.Compare(clientv3.ModRevision(string(kv.Key)), "=", kv.ModRevision)).
				Then(clientv3.OpPut(string(kv.Key), string(nv))).Commit()
			if err != nil {
				return etcdErr(err)
			}
			n++
		}
		return nil
	})
	return n, err
}

// OldKeyRecords counts the records holding anything sealed with a key other
// than the sealing key: while it is above 0, the key file must keep the
// older keys.
func (s *Store) OldKeyRecords(ctx context.Context) (int, error) {
	n := 0
	for _, p := range []struct {
		base  string
		stale func([]byte) bool
	}{{"connections/", s.codec.ConnectionNeedsReseal}, {"deleting/", s.codec.ConnectionNeedsReseal}, {"tokens/", s.codec.TokensNeedsReseal}} {
		base := s.prefix + p.base
		_, err := s.eachPage(ctx, base, base, 0, func(kvs []*mvccpb.KeyValue, _ int64) error {
			for _, kv := range kvs {
				if p.stale(kv.Value) {
					n++
				}
			}
			return nil
		})
		if err != nil {
			return n, err
		}
	}
	return n, nil
}

// Upgraded is how many records written in format 1 (which authenticated
// only the secrets) were accepted as they were and authenticated at open.
func (s *Store) Upgraded() int { return s.upgraded }

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
	// Best effort: etcd answered the grant just now. Were this to fail, a
	// rekey would not see this replica until its next session.
	_ = s.announce(ctx, lease.ID)
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

// deletingKey holds the connection record of a delete in progress (see
// [Store.MarkDeleting]): not under connections/, so every read and watch
// treats it as gone.
func (s *Store) deletingKey(name string) string { return s.prefix + "deleting/" + name }

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
		If(clientv3.Compare(clientv3.CreateRevision(ck), "=", 0), clientv3.Compare(clientv3.CreateRevision(s.deletingKey(c.Name)), "=", 0)).
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
	resp, err := s.cli.Txn(ctx).Then(clientv3.OpGet(s.connKey(name), clientv3.WithCountOnly()), clientv3.OpGet(s.tokenKey(name))).Commit()
	if err != nil {
		return nil, etcdErr(err)
	}
	kvs := resp.Responses[1].GetResponseRange().GetKvs()
	if resp.Responses[0].GetResponseRange().GetCount() == 0 || len(kvs) == 0 {
		return nil, fmt.Errorf("%w: %s", storage.ErrNotFound, name)
	}
	return s.decodeTokens(name, kvs[0].Value)
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
	modRev, err := s.atRevision(ctx, c.Name, c.Revision)
	if err != nil {
		return nil, err
	}
	next, cv, tv, err := s.codec.EncodeRecords(c, c.Revision+1, t)
	if err != nil {
		return nil, err
	}
	var rp *resealPut
	if tv == nil {
		// Unchanged token state still moves to the sealing key.
		rp = s.resealOp(ctx, c.Name, s.tokenKey(c.Name), s.codec.TokensNeedsReseal, s.codec.ResealTokens)
	}
	resp, err := s.updateTxn(ctx, c.Name, modRev, cv, tv, rp)
	if err == nil && !resp.Succeeded && rp != nil && unchangedSince(resp, modRev) {
		// Only the token record changed (a refresh committed it, sealed
		// with the sealing key): update without the reseal.
		resp, err = s.updateTxn(ctx, c.Name, modRev, cv, tv, nil)
	}
	if err != nil {
		return nil, etcdErr(err)
	}
	if !resp.Succeeded {
		if _, fenced := s.fence(c.Name); tv != nil && fenced && unchangedSince(resp, modRev) {
			return nil, fmt.Errorf("%w: %s", storage.ErrLockLost, c.Name)
		}
		return nil, fmt.Errorf("%w: %s changed concurrently", storage.ErrConflict, c.Name)
	}
	return next, nil
}

// atRevision returns the etcd revision of name's connection record, which
// must be at the connection revision want.
func (s *Store) atRevision(ctx context.Context, name string, want int64) (int64, error) {
	v, modRev, err := s.get(ctx, s.connKey(name))
	if errors.Is(err, storage.ErrNotFound) {
		return 0, fmt.Errorf("%w: %s", storage.ErrNotFound, name)
	}
	if err != nil {
		return 0, err
	}
	rev, err := storage.Revision(v)
	if err != nil {
		return 0, err
	}
	if rev != want {
		return 0, fmt.Errorf("%w: %s is at revision %d, not %d", storage.ErrConflict, name, rev, want)
	}
	return modRev, nil
}

// updateTxn writes a connection record (if still at modRev) and, when tv
// is set, its token record under the fence; or, with rp, the token record
// resealed. It fails returning the connection key's current revision.
func (s *Store) updateTxn(ctx context.Context, name string, modRev int64, cv, tv []byte, rp *resealPut) (*clientv3.TxnResponse, error) {
	ck := s.connKey(name)
	ops := []clientv3.Op{clientv3.OpPut(ck, string(cv))}
	conds := []clientv3.Cmp{clientv3.Compare(clientv3.ModRevision(ck), "=", modRev)}
	if tv != nil {
		ops = append(ops, clientv3.OpPut(s.tokenKey(name), string(tv)))
		if fence, fenced := s.fence(name); fenced {
			conds = append(conds, fence)
		}
	}
	if rp != nil {
		conds, ops = append(conds, rp.cmp), append(ops, rp.op)
	}
	return s.cli.Txn(ctx).If(conds...).Then(ops...).Else(clientv3.OpGet(ck, clientv3.WithKeysOnly())).Commit()
}

// unchangedSince reports whether a failed updateTxn found the connection
// key still at modRev: something else than the connection failed the
// comparison.
func unchangedSince(resp *clientv3.TxnResponse, modRev int64) bool {
	kvs := resp.Responses[0].GetResponseRange().GetKvs()
	return len(kvs) == 1 && kvs[0].ModRevision == modRev
}

// MarkDeleting starts a delete durably: the connection record (whose
// Revision must equal revision unless it is 0) moves from connections/ to
// deleting/ with its DeleteTime set, so every read and watch treats it as
// gone, while it and its tokens stay stored until [Store.DeleteConnection]
// erases them. LoadAll reports it, so a delete interrupted by a crash is
// finished at the next start.
func (s *Store) MarkDeleting(ctx context.Context, name string, revision int64) error {
	ck := s.connKey(name)
	v, modRev, err := s.get(ctx, ck)
	if errors.Is(err, storage.ErrNotFound) {
		return fmt.Errorf("%w: %s", storage.ErrNotFound, name)
	}
	if err != nil {
		return err
	}
	dv, err := s.codec.MarkDeleting(name, v, revision, s.now())
	if err != nil {
		return err
	}
	resp, err := s.cli.Txn(ctx).If(clientv3.Compare(clientv3.ModRevision(ck), "=", modRev)).
		Then(clientv3.OpPut(s.deletingKey(name), string(dv)), clientv3.OpDelete(ck)).Commit()
	if err != nil {
		return etcdErr(err)
	}
	if !resp.Succeeded {
		return fmt.Errorf("%w: %s changed concurrently", storage.ErrConflict, name)
	}
	return nil
}

// DeleteConnection erases a connection and its tokens, or finishes a delete
// [Store.MarkDeleting] started. A revision other than 0 must match the
// stored one. The values stay in etcd's history until the cluster's
// compaction passes this revision, and in its backend file until it is
// defragmented; both are the cluster operator's (see README).
func (s *Store) DeleteConnection(ctx context.Context, name string, revision int64) error {
	key := s.connKey(name)
	v, modRev, err := s.get(ctx, key)
	if errors.Is(err, storage.ErrNotFound) {
		key = s.deletingKey(name)
		v, modRev, err = s.get(ctx, key)
	}
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
	resp, err := s.cli.Txn(ctx).If(clientv3.Compare(clientv3.ModRevision(key), "=", modRev)).
		Then(clientv3.OpDelete(key), clientv3.OpDelete(s.tokenKey(name))).Commit()
	if err != nil {
		return etcdErr(err)
	}
	if !resp.Succeeded {
		return fmt.Errorf("%w: %s changed concurrently", storage.ErrConflict, name)
	}
	return nil
}

// PutTokens durably replaces a connection's token state; [storage.ErrNotFound] if
// the connection was deleted. While keys rotate, the connection record is
// resealed with the sealing key in the same transaction if it holds
// anything sealed with an older one.
func (s *Store) PutTokens(ctx context.Context, name string, t *storage.Tokens) error {
	tv, err := s.codec.EncodeTokens(name, t)
	if err != nil {
		return err
	}
	if rp := s.resealOp(ctx, name, s.connKey(name), s.codec.ConnectionNeedsReseal, s.codec.ResealConnection); rp != nil {
		err := s.putTokens(ctx, name, tv, rp)
		if !errors.Is(err, errResealRaced) {
			return err
		}
		// The connection changed since read: the write that changed it
		// sealed it anew; store the tokens alone.
	}
	return s.putTokens(ctx, name, tv, nil)
}

var errResealRaced = errors.New("storage: etcd: record changed while resealing")

// putTokens writes tv under the fence, with the reseal rp when not nil.
func (s *Store) putTokens(ctx context.Context, name string, tv []byte, rp *resealPut) error {
	ck := s.connKey(name)
	conds := []clientv3.Cmp{clientv3.Compare(clientv3.CreateRevision(ck), ">", 0)}
	ops := []clientv3.Op{clientv3.OpPut(s.tokenKey(name), string(tv))}
	if rp != nil {
		conds, ops = append(conds, rp.cmp), append(ops, rp.op)
	}
	fence, fenced := s.fence(name)
	if fenced {
		conds = append(conds, fence)
	}
	resp, err := s.cli.Txn(ctx).If(conds...).Then(ops...).
		Else(clientv3.OpGet(ck, clientv3.WithCountOnly())).Commit()
	if err != nil {
		return etcdErr(err)
	}
	if !resp.Succeeded {
		switch {
		case resp.Responses[0].GetResponseRange().GetCount() == 0:
			return fmt.Errorf("%w: %s", storage.ErrNotFound, name)
		case rp != nil:
			return errResealRaced
		case fenced:
			return fmt.Errorf("%w: %s", storage.ErrLockLost, name)
		}
		return fmt.Errorf("%w: %s", storage.ErrNotFound, name)
	}
	return nil
}

// resealOp reads the record at key and, if stale says it holds anything
// sealed with an older key, returns the put that reseals it and the
// comparison that keeps the put from overwriting a newer record. Only while
// keys rotate; a record that cannot be read or checked is left alone.
func (s *Store) resealOp(ctx context.Context, name, key string, stale func([]byte) bool, reseal func(string, []byte) ([]byte, error)) *resealPut {
	if !s.codec.Rotating() {
		return nil
	}
	v, modRev, err := s.get(ctx, key)
	if err != nil || !stale(v) {
		return nil
	}
	nv, err := reseal(name, v)
	if err != nil {
		return nil
	}
	return &resealPut{clientv3.Compare(clientv3.ModRevision(key), "=", modRev), clientv3.OpPut(key, string(nv))}
}

// resealPut rewrites a record with the sealing key if it is unchanged.
type resealPut struct {
	cmp clientv3.Cmp
	op  clientv3.Op
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
// order, then for every delete in progress (DeleteTime set), reading in
// pages at one etcd revision; [Store.Watch]
// continues from that revision.
func (s *Store) LoadAll(ctx context.Context, fn func(*storage.Connection, *storage.Tokens) error) error {
	rev, err := s.loadAll(ctx, fn)
	if err == nil {
		s.loadedRev.Store(rev)
	}
	return err
}

func (s *Store) loadAll(ctx context.Context, fn func(*storage.Connection, *storage.Tokens) error) (int64, error) {
	rev, err := s.loadPrefix(ctx, s.prefix+"connections/", 0, fn)
	if err != nil {
		return 0, err
	}
	// Deletes in progress, at the same revision.
	return s.loadPrefix(ctx, s.prefix+"deleting/", rev, fn)
}

// loadPrefix calls fn for every connection record under base and its
// tokens, at revision rev (0: the current one, which it returns).
func (s *Store) loadPrefix(ctx context.Context, base string, rev int64, fn func(*storage.Connection, *storage.Tokens) error) (int64, error) {
	return s.eachWithTokens(ctx, base, base, rev, func(name string, cv, tv []byte) error {
		c, err := s.decodeConnection(name, cv)
		if err != nil {
			return err
		}
		t := &storage.Tokens{}
		if tv != nil {
			if t, err = s.decodeTokens(name, tv); err != nil {
				return err
			}
		}
		return fn(c, t)
	})
}

// eachWithTokens calls fn for every connection record under base from the
// key start on, with its token record (nil if it has none), reading pages
// at revision rev (0: the current one, fixed at the first page). It
// returns the revision read at.
func (s *Store) eachWithTokens(ctx context.Context, base, start string, rev int64, fn func(name string, cv, tv []byte) error) (int64, error) {
	return s.eachPage(ctx, base, start, rev, func(kvs []*mvccpb.KeyValue, rev int64) error {
		toks, err := s.tokensFor(ctx, kvs, base, rev)
		if err != nil {
			return err
		}
		for _, kv := range kvs {
			name := strings.TrimPrefix(string(kv.Key), base)
			if err := fn(name, kv.Value, toks[name]); err != nil {
				return err
			}
		}
		return nil
	})
}

// eachPage reads the keys under base from the key start on, at most
// pageSize at a time (etcd caps response sizes), all at revision rev (0:
// the current one, fixed at the first page), and calls fn with each page
// and the revision. It returns that revision.
func (s *Store) eachPage(ctx context.Context, base, start string, rev int64, fn func(kvs []*mvccpb.KeyValue, rev int64) error) (int64, error) {
	key := start
	for {
		opts := []clientv3.OpOption{clientv3.WithRange(clientv3.GetPrefixRangeEnd(base)), clientv3.WithLimit(pageSize)}
		if rev != 0 {
			opts = append(opts, clientv3.WithRev(rev))
		}
		resp, err := s.cli.Get(ctx, key, opts...)
		if err != nil {
			return rev, etcdErr(err)
		}
		rev = resp.Header.Revision
		if err := fn(resp.Kvs, rev); err != nil {
			return rev, err
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
