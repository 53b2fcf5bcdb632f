package etcd

import (
	"context"
	"errors"
	"fmt"
	"strconv"
	"strings"

	clientv3 "go.etcd.io/etcd/client/v3"

	"tokenbroker/storage"
)

// maxTxnOps keeps one transaction under etcd's default --max-txn-ops (128).
const maxTxnOps = 128

func (s *Store) metaKey() string     { return s.prefix + "meta" }
func (s *Store) replicaBase() string { return s.prefix + "replicas/" }

// announce publishes, under the session's lease, the key ids this replica
// holds, its sealing key first: a rekey checks that every running replica
// seals with the new key, and a restore that none runs. The entry goes
// when the replica stops or its lease lapses.
func (s *Store) announce(ctx context.Context, lease clientv3.LeaseID) error {
	key := s.replicaBase() + strconv.FormatInt(int64(lease), 16)
	if _, err := s.cli.Put(ctx, key, strings.Join(s.codec.SealingKeyIDs(), ","), clientv3.WithLease(lease)); err != nil {
		return etcdErr(err)
	}
	return nil
}

// Replicas lists the running replicas that announced their keys.
func (s *Store) Replicas(ctx context.Context) ([]storage.Replica, error) {
	return replicas(ctx, s.cli, s.replicaBase())
}

func replicas(ctx context.Context, cli *clientv3.Client, base string) ([]storage.Replica, error) {
	resp, err := cli.Get(ctx, base, clientv3.WithPrefix())
	if err != nil {
		return nil, etcdErr(err)
	}
	out := make([]storage.Replica, 0, len(resp.Kvs))
	for _, kv := range resp.Kvs {
		out = append(out, storage.Replica{
			ID:     strings.TrimPrefix(string(kv.Key), base),
			KeyIDs: strings.Split(string(kv.Value), ","),
		})
	}
	return out, nil
}

// SealingKeyIDs lists the store's key ids, the sealing key first.
func (s *Store) SealingKeyIDs() []string { return s.codec.SealingKeyIDs() }

// Snapshot reads every connection at one etcd revision, page by page:
// header gets the meta record, the count and the revision first, then each
// gets every connection's records in name order.
func (s *Store) Snapshot(ctx context.Context, header func(storage.SnapshotInfo) error, each func(storage.Record) error) error {
	meta, err := s.cli.Get(ctx, s.metaKey())
	if err != nil {
		return etcdErr(err)
	}
	if len(meta.Kvs) == 0 {
		return fmt.Errorf("%w: etcd prefix %s has no meta record", storage.ErrNotDataFile, s.prefix)
	}
	rev := meta.Header.Revision
	base := s.prefix + "connections/"
	count, err := s.cli.Get(ctx, base, clientv3.WithPrefix(), clientv3.WithCountOnly(), clientv3.WithRev(rev))
	if err != nil {
		return etcdErr(err)
	}
	info := storage.SnapshotInfo{Store: "etcd", Meta: meta.Kvs[0].Value, Count: count.Count, Revision: rev}
	if err := header(info); err != nil {
		return err
	}
	return s.eachAt(ctx, rev, "", func(name string, cv, tv []byte) error {
		return each(storage.Record{Name: name, Connection: cv, Tokens: tv})
	})
}

// eachAt calls fn for every connection after the name after, with its
// token record, reading pages at revision rev (0: the current one, fixed
// at the first page).
func (s *Store) eachAt(ctx context.Context, rev int64, after string, fn func(name string, cv, tv []byte) error) error {
	base := s.prefix + "connections/"
	start := base
	if after != "" {
		start = base + after + "\x00"
	}
	_, err := s.eachWithTokens(ctx, base, start, rev, fn)
	return err
}

// KeyUse counts every stored value by the keys that sealed it, at one
// revision.
func (s *Store) KeyUse(ctx context.Context) (storage.KeyUse, error) {
	var u storage.KeyUse
	meta, err := s.cli.Get(ctx, s.metaKey())
	if err != nil {
		return u, etcdErr(err)
	}
	if len(meta.Kvs) == 1 {
		if err := u.Add(s.codec, storage.KindMeta, meta.Kvs[0].Value); err != nil {
			return u, err
		}
	}
	count := func(_ string, c, t *revValue) error {
		if err := u.Add(s.codec, storage.KindConnection, c.value); err != nil {
			return err
		}
		if t == nil {
			return nil
		}
		return u.Add(s.codec, storage.KindTokens, t.value)
	}
	if err := s.eachRevs(ctx, "", count); err != nil {
		return u, err
	}
	return u, s.eachDeleting(ctx, count)
}

// eachDeleting calls fn for every delete in progress (see
// [Store.MarkDeleting]) with its record and tokens: few, and a store
// refuses to start without a key they need.
func (s *Store) eachDeleting(ctx context.Context, fn func(name string, c, t *revValue) error) error {
	base := s.prefix + "deleting/"
	resp, err := s.cli.Get(ctx, base, clientv3.WithPrefix())
	if err != nil {
		return etcdErr(err)
	}
	for _, kv := range resp.Kvs {
		name := strings.TrimPrefix(string(kv.Key), base)
		var t *revValue
		tr, err := s.cli.Get(ctx, s.tokenKey(name))
		if err != nil {
			return etcdErr(err)
		}
		if len(tr.Kvs) == 1 {
			t = &revValue{tr.Kvs[0].Value, tr.Kvs[0].ModRevision}
		}
		if err := fn(name, &revValue{kv.Value, kv.ModRevision}, t); err != nil {
			return err
		}
	}
	return nil
}

// staleValue is one stored value to reseal, and the revision it was read at.
type staleValue struct {
	key    string
	name   string
	kind   storage.Kind
	old    []byte
	modRev int64
	new    []byte
}

// ResealBatch reseals with the sealing key up to limit stored values not
// sealed with it, among the connections after the name after ("" starts
// with the meta record). Each value is written only if it is unchanged
// since it was read (a value a replica rewrote is sealed with the sealing
// key already, as every replica must be). It returns the name to continue
// after, "" when the pass is done. Interrupted anywhere, nothing is lost:
// a pass that starts again finds what is still stale.
func (s *Store) ResealBatch(ctx context.Context, after string, limit int) (next string, st storage.ResealStats, err error) {
	batch, next, st, err := s.findStale(ctx, after, limit)
	if err != nil {
		return "", st, err
	}
	for i := range batch {
		b := &batch[i]
		where := b.name
		if b.kind == storage.KindMeta {
			where = "etcd prefix " + s.prefix
		}
		if b.new, err = s.codec.Reseal(b.kind, where, b.old); err != nil {
			return "", st, fmt.Errorf("storage: reseal %s: %w", where, err)
		}
	}
	for start := 0; start < len(batch); start += maxTxnOps {
		part := batch[start:min(start+maxTxnOps, len(batch))]
		n, err := s.writeResealed(ctx, part)
		st.Resealed += n
		if err != nil {
			return "", st, err
		}
	}
	return next, st, nil
}

// writeResealed writes one transaction of resealed values, each only if
// unchanged. When one changed, the others are written one by one.
func (s *Store) writeResealed(ctx context.Context, part []staleValue) (int64, error) {
	conds := make([]clientv3.Cmp, 0, len(part))
	ops := make([]clientv3.Op, 0, len(part))
	for _, b := range part {
		conds = append(conds, clientv3.Compare(clientv3.ModRevision(b.key), "=", b.modRev))
		ops = append(ops, clientv3.OpPut(b.key, string(b.new)))
	}
	resp, err := s.cli.Txn(ctx).If(conds...).Then(ops...).Commit()
	if err != nil {
		return 0, etcdErr(err)
	}
	if resp.Succeeded {
		return int64(len(part)), nil
	}
	var n int64
	for i := range part {
		resp, err := s.cli.Txn(ctx).If(conds[i]).Then(ops[i]).Commit()
		if err != nil {
			return n, etcdErr(err)
		}
		if resp.Succeeded {
			n++
		}
	}
	return n, nil
}

// findStale collects up to limit stale values among the connections after
// the name after, examining at most 8*limit connections.
func (s *Store) findStale(ctx context.Context, after string, limit int) (batch []staleValue, next string, st storage.ResealStats, err error) {
	if after == "" {
		resp, err := s.cli.Get(ctx, s.metaKey())
		if err != nil {
			return nil, "", st, etcdErr(err)
		}
		if len(resp.Kvs) == 1 {
			st.Examined++
			kv := resp.Kvs[0]
			if ok, err := s.codec.Stale(storage.KindMeta, kv.Value); err != nil {
				return nil, "", st, err
			} else if ok {
				batch = append(batch, staleValue{key: s.metaKey(), kind: storage.KindMeta, old: kv.Value, modRev: kv.ModRevision})
			}
		}
	}
	if after == "" {
		err := s.eachDeleting(ctx, func(name string, c, t *revValue) error {
			return s.addStale(&batch, &st, name, s.prefix+"deleting/"+name, c, t)
		})
		if err != nil {
			return nil, "", st, err
		}
	}
	seen, last := 0, ""
	err = s.eachRevs(ctx, after, func(name string, c, t *revValue) error {
		if len(batch) >= limit || seen >= 8*limit {
			next = last
			return errBatchFull
		}
		seen, last = seen+1, name
		return s.addStale(&batch, &st, name, s.connKey(name), c, t)
	})
	if errors.Is(err, errBatchFull) {
		err = nil
	}
	return batch, next, st, err
}

// addStale adds to batch those of a connection's record (stored at ckey)
// and tokens that need resealing.
func (s *Store) addStale(batch *[]staleValue, st *storage.ResealStats, name, ckey string, c, t *revValue) error {
	for _, v := range []struct {
		key  string
		kind storage.Kind
		val  *revValue
	}{{ckey, storage.KindConnection, c}, {s.tokenKey(name), storage.KindTokens, t}} {
		if v.val == nil {
			continue
		}
		st.Examined++
		ok, err := s.codec.Stale(v.kind, v.val.value)
		if err != nil {
			return fmt.Errorf("storage: %s: %w", name, err)
		}
		if ok {
			*batch = append(*batch, staleValue{key: v.key, name: name, kind: v.kind, old: v.val.value, modRev: v.val.modRev})
		}
	}
	return nil
}

// errBatchFull ends a scan once a batch is full.
var errBatchFull = errors.New("batch full")

// revValue is a stored value with its mod revision.
type revValue struct {
	value  []byte
	modRev int64
}

// eachRevs calls fn for every connection after the name after with both
// values and their mod revisions, page by page, each page (connections
// and their tokens) read at one revision.
func (s *Store) eachRevs(ctx context.Context, after string, fn func(name string, c, t *revValue) error) error {
	for {
		last, more, err := s.revPage(ctx, after, fn)
		if err != nil || !more {
			return err
		}
		after = last
	}
}

// revPage calls fn for one page of connections after the name after and
// returns the last name and whether more follow.
func (s *Store) revPage(ctx context.Context, after string, fn func(name string, c, t *revValue) error) (last string, more bool, err error) {
	base := s.prefix + "connections/"
	key := base
	if after != "" {
		key = base + after + "\x00"
	}
	resp, err := s.cli.Get(ctx, key, clientv3.WithRange(clientv3.GetPrefixRangeEnd(base)), clientv3.WithLimit(pageSize))
	if err != nil || len(resp.Kvs) == 0 {
		return "", false, etcdErrOrNil(err)
	}
	first := strings.TrimPrefix(string(resp.Kvs[0].Key), base)
	last = strings.TrimPrefix(string(resp.Kvs[len(resp.Kvs)-1].Key), base)
	toks, err := s.cli.Get(ctx, s.tokenKey(first), clientv3.WithRange(s.tokenKey(last)+"\x00"), clientv3.WithRev(resp.Header.Revision))
	if err != nil {
		return "", false, etcdErr(err)
	}
	tbase := s.tokenKey("")
	tv := make(map[string]*revValue, len(toks.Kvs))
	for _, kv := range toks.Kvs {
		tv[strings.TrimPrefix(string(kv.Key), tbase)] = &revValue{kv.Value, kv.ModRevision}
	}
	for _, kv := range resp.Kvs {
		name := strings.TrimPrefix(string(kv.Key), base)
		if err := fn(name, &revValue{kv.Value, kv.ModRevision}, tv[name]); err != nil {
			return "", false, err
		}
	}
	return last, resp.More, nil
}

func etcdErrOrNil(err error) error {
	if err == nil {
		return nil
	}
	return etcdErr(err)
}
