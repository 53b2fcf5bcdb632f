package etcd

import (
	"context"
	"fmt"
	"strings"
	"time"

	clientv3 "go.etcd.io/etcd/client/v3"

	"tokenbroker/storage"
	"tokenbroker/storage/bolt"
)

// RestoreOptions configure [Restore].
type RestoreOptions struct {
	// Client talks to the etcd cluster. Required.
	Client *clientv3.Client
	// Prefix namespaces every key. Default "/tokenbroker/".
	Prefix string
	// Keyring must open every record of the backup, and the prefix's meta
	// record if there is one. Required.
	Keyring *storage.Keyring
	// Replace allows replacing connections of the same names.
	Replace bool
	// Now stamps the restore intent. Default time.Now.
	Now func() time.Time

	// beforeBatch, in tests, runs before batch i is written.
	beforeBatch func(i int)
}

// restoreBatch is how many connections one transaction writes: two keys
// each, under etcd's default limit of 128 operations per transaction.
const restoreBatch = maxTxnOps / 2

// written is one key a restore wrote: what it held before (nil: absent)
// and the revision the restore's write created, for the rollback.
type written struct {
	key    string
	before *revValue
	rev    int64
}

// Restore writes every connection of src under the prefix, in batched
// transactions, after checking that the key opens every record of src and
// the prefix's meta record. It refuses while a replica runs on the prefix
// and, unless Replace, when any of src's names exists. If a batch fails,
// the batches written before it are rolled back: each key gets its
// previous value back (or is deleted), provided nothing wrote it since.
// Token chains are marked with [storage.IntentRestored]. It returns how
// many connections it restored.
func Restore(ctx context.Context, src *bolt.Backup, opts RestoreOptions) (int64, error) {
	if opts.Prefix == "" {
		opts.Prefix = "/tokenbroker/"
	}
	if !strings.HasSuffix(opts.Prefix, "/") {
		opts.Prefix += "/"
	}
	if opts.Now == nil {
		opts.Now = time.Now
	}
	s := &Store{cli: opts.Client, codec: storage.NewCodec(opts.Keyring), prefix: opts.Prefix}
	if err := s.checkRestoreTarget(ctx); err != nil {
		return 0, err
	}
	if _, err := src.Verify(opts.Keyring); err != nil {
		return 0, err
	}
	current, err := s.currentValues(ctx)
	if err != nil {
		return 0, err
	}
	if !opts.Replace {
		if err := refuseExisting(src, current, s.prefix); err != nil {
			return 0, err
		}
	}
	r := &restorer{s: s, opts: opts, current: current}
	n, err := r.run(ctx, src)
	if err != nil {
		return 0, r.rollback(err)
	}
	return n, nil
}

// checkRestoreTarget refuses a prefix with running replicas or a meta
// record the key does not open.
func (s *Store) checkRestoreTarget(ctx context.Context) error {
	reps, err := s.Replicas(ctx)
	if err != nil {
		return err
	}
	if len(reps) > 0 {
		return fmt.Errorf("storage: %d broker replicas run on etcd prefix %s (first: %s); stop them before restoring", len(reps), s.prefix, reps[0].ID)
	}
	resp, err := s.cli.Get(ctx, s.metaKey())
	if err != nil {
		return etcdErr(err)
	}
	if len(resp.Kvs) == 1 {
		return s.codec.CheckMeta("etcd prefix "+s.prefix, resp.Kvs[0].Value)
	}
	return nil
}

// currentValues reads every connection and token key under the prefix,
// with its mod revision: what a rollback puts back.
func (s *Store) currentValues(ctx context.Context) (map[string]*revValue, error) {
	out := map[string]*revValue{}
	resp, err := s.cli.Get(ctx, s.metaKey())
	if err != nil {
		return nil, etcdErr(err)
	}
	for _, kv := range resp.Kvs {
		out[string(kv.Key)] = &revValue{kv.Value, kv.ModRevision}
	}
	err = s.eachRevs(ctx, "", func(name string, c, t *revValue) error {
		out[s.connKey(name)] = c
		if t != nil {
			out[s.tokenKey(name)] = t
		}
		return nil
	})
	return out, err
}

// refuseExisting fails if any connection of src exists under the prefix.
func refuseExisting(src *bolt.Backup, current map[string]*revValue, prefix string) error {
	var first string
	n := 0
	err := src.Each(func(r storage.Record) error {
		if _, ok := current[prefix+"connections/"+r.Name]; ok {
			if n == 0 {
				first = r.Name
			}
			n++
		}
		return nil
	})
	if err != nil {
		return err
	}
	if n > 0 {
		return fmt.Errorf("%w: %d of the backup's connections exist under etcd prefix %s (first: %s); give --replace to replace them", storage.ErrAlreadyExists, n, prefix, first)
	}
	return nil
}

// restorer writes one restore's batches and remembers what it wrote.
type restorer struct {
	s       *Store
	opts    RestoreOptions
	current map[string]*revValue
	done    []written // in write order
	batches int
}

// run writes the meta record if there is none, then src in batches.
func (r *restorer) run(ctx context.Context, src *bolt.Backup) (int64, error) {
	var ops []clientv3.Op
	var keys []string
	if r.current[r.s.metaKey()] == nil {
		meta, err := r.s.codec.EncodeMeta(r.opts.Now())
		if err != nil {
			return 0, err
		}
		ops, keys = append(ops, clientv3.OpPut(r.s.metaKey(), string(meta))), append(keys, r.s.metaKey())
		if err := r.write(ctx, ops, keys); err != nil {
			return 0, err
		}
		ops, keys = ops[:0], keys[:0]
	}
	var n int64
	err := src.Each(func(rec storage.Record) error {
		cv, err := r.s.codec.RestoredConnection(rec)
		if err != nil {
			return err
		}
		tv, err := r.s.codec.RestoredTokens(rec, r.opts.Now())
		if err != nil {
			return err
		}
		ck, tk := r.s.connKey(rec.Name), r.s.tokenKey(rec.Name)
		ops = append(ops, clientv3.OpPut(ck, string(cv)), clientv3.OpPut(tk, string(tv)))
		keys = append(keys, ck, tk)
		n++
		if len(ops) < 2*restoreBatch {
			return nil
		}
		err = r.write(ctx, ops, keys)
		ops, keys = ops[:0], keys[:0]
		return err
	})
	if err == nil && len(ops) > 0 {
		err = r.write(ctx, ops, keys)
	}
	return n, err
}

// write commits one batch, each key only if unchanged since the restore
// read it, and records it for the rollback.
func (r *restorer) write(ctx context.Context, ops []clientv3.Op, keys []string) error {
	if r.opts.beforeBatch != nil {
		r.opts.beforeBatch(r.batches)
	}
	r.batches++
	conds := make([]clientv3.Cmp, len(keys))
	for i, k := range keys {
		conds[i] = asRead(k, r.current[k])
	}
	resp, err := r.s.cli.Txn(ctx).If(conds...).Then(ops...).Commit()
	if err != nil {
		return etcdErr(err)
	}
	if !resp.Succeeded {
		return fmt.Errorf("%w: a key under etcd prefix %s was written while restoring (batch %d)", storage.ErrConflict, r.s.prefix, r.batches)
	}
	for _, k := range keys {
		r.done = append(r.done, written{key: k, before: r.current[k], rev: resp.Header.Revision})
	}
	return nil
}

// asRead compares key with what the restore read of it.
func asRead(key string, v *revValue) clientv3.Cmp {
	if v == nil {
		return clientv3.Compare(clientv3.CreateRevision(key), "=", 0)
	}
	return clientv3.Compare(clientv3.ModRevision(key), "=", v.modRev)
}

// rollback undoes the committed batches, newest first, each key only if
// the restore's write is still what it holds. It returns the restore's
// failure, saying whether the rollback was complete.
func (r *restorer) rollback(cause error) error {
	if len(r.done) == 0 {
		return fmt.Errorf("storage: restore: nothing written: %w", cause)
	}
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	var left []string
	for end := len(r.done); end > 0; end -= maxTxnOps {
		part := r.done[max(end-maxTxnOps, 0):end]
		left = append(left, r.undo(ctx, part)...)
	}
	if len(left) > 0 {
		return fmt.Errorf("storage: restore failed (%v) and %d keys could not be rolled back because they changed since (first: %s)", cause, len(left), left[0])
	}
	return fmt.Errorf("storage: restore: rolled back, nothing left written: %w", cause)
}

// undo rolls back one part of the written keys and returns those it could
// not.
func (r *restorer) undo(ctx context.Context, part []written) []string {
	conds := make([]clientv3.Cmp, len(part))
	ops := make([]clientv3.Op, len(part))
	for i, w := range part {
		conds[i] = clientv3.Compare(clientv3.ModRevision(w.key), "=", w.rev)
		ops[i] = clientv3.OpDelete(w.key)
		if w.before != nil {
			ops[i] = clientv3.OpPut(w.key, string(w.before.value))
		}
	}
	resp, err := r.s.cli.Txn(ctx).If(conds...).Then(ops...).Commit()
	if err == nil && resp.Succeeded {
		return nil
	}
	// One by one, to undo what can be undone.
	var left []string
	for i, w := range part {
		resp, err := r.s.cli.Txn(ctx).If(conds[i]).Then(ops[i]).Commit()
		if err != nil || !resp.Succeeded {
			left = append(left, w.key)
		}
	}
	return left
}
