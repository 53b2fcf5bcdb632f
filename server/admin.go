package server

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"slices"
	"strings"
	"time"

	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"

	adminv1 "tokenbroker/gen/tokenbroker/admin/v1"

	"tokenbroker/storage"
)

// AdminStore is what the admin service needs of the store: a consistent
// snapshot, resealing in batches and key counts. Both stores have it.
type AdminStore interface {
	// Snapshot calls header once, then each for every connection in name
	// order, from one consistent view of the store.
	Snapshot(ctx context.Context, header func(storage.SnapshotInfo) error, each func(storage.Record) error) error
	// ResealBatch reseals one batch after the name after and returns where
	// to go on ("" when the pass is done).
	ResealBatch(ctx context.Context, after string, limit int) (next string, st storage.ResealStats, err error)
	// KeyUse counts the stored values by the keys that sealed them.
	KeyUse(ctx context.Context) (storage.KeyUse, error)
	// SealingKeyIDs are this process's key ids, the sealing key first.
	SealingKeyIDs() []string
}

// ReplicaLister is what a store shared by replicas adds: the replicas
// running on it, with the keys each holds.
type ReplicaLister interface {
	Replicas(ctx context.Context) ([]storage.Replica, error)
}

// adminMethods prefixes the full names of the admin service's methods.
const adminMethods = "/" + "tokenbroker.admin.v1.AdminBroker" + "/"

// operatorOfAll reports whether identity may call the admin service: an
// operator of every tenant. In dev mode (no policy) every local caller is
// one, as it is an operator of every tenant for TokenBroker.
func operatorOfAll(p *Policy, identity string) bool {
	return p == nil || p.CanManage(identity, "*")
}

// defaultRekeyBatch is how many stored values one rekey write reseals.
const defaultRekeyBatch = 500

// Backups and rekeys run beside serving, on the same cores: after each
// chunk or batch they pause this many times as long as the chunk took, so
// that they take a bounded share of the CPU (1/32 for a backup, a
// half for a rekey) and serving keeps the rest. The backup's share is
// small because its client (decoding, file writes) and the kernel's
// copies cost several times the server's own work, and pausing the
// stream paces them too. A backup of 100,000 connections takes a few
// seconds; docs/benchmarks-lifecycle.md has the figures.
const (
	backupPause = 31
	rekeyPause  = 1
)

// pacer spaces out steps of background work: each pause lasts factor
// times the time since the previous pause ended.
type pacer struct {
	factor int
	since  time.Time
}

func newPacer(factor int) *pacer { return &pacer{factor: factor, since: time.Now()} }

// pause waits, unless ctx ends first.
func (p *pacer) pause(ctx context.Context) error {
	wait := time.Since(p.since) * time.Duration(p.factor)
	t := time.NewTimer(wait)
	defer t.Stop()
	select {
	case <-ctx.Done():
		return ctx.Err()
	case <-t.C:
	}
	p.since = time.Now()
	return nil
}

// adminService serves tokenbroker.admin.v1.AdminBroker.
type adminService struct {
	adminv1.UnimplementedAdminBrokerServer
	store AdminStore
	log   *slog.Logger
}

// backupChunk bounds the records' bytes in one streamed message, well
// under a client's default 4 MiB receive limit.
const backupChunk = 1 << 20

// Backup streams a snapshot, chunk by chunk, from one view of the store.
func (a *adminService) Backup(_ *adminv1.BackupRequest, ss grpc.ServerStreamingServer[adminv1.BackupResponse]) error {
	ctx := ss.Context()
	var sent int64
	msg := &adminv1.BackupResponse{}
	size := 0
	pace := newPacer(backupPause)
	flush := func() error {
		if msg.Header == nil && len(msg.Records) == 0 {
			return nil
		}
		err := ss.Send(msg)
		sent += int64(len(msg.Records))
		msg, size = &adminv1.BackupResponse{}, 0
		if err != nil {
			return err
		}
		return pace.pause(ctx)
	}
	err := a.store.Snapshot(ctx, func(info storage.SnapshotInfo) error {
		msg.Header = &adminv1.BackupHeader{
			Meta: info.Meta, ConnectionCount: info.Count, Store: info.Store,
			EtcdRevision: info.Revision, SealingKeyId: a.store.SealingKeyIDs()[0],
		}
		return flush()
	}, func(r storage.Record) error {
		// Send copies what it marshals; the values need not outlive it.
		msg.Records = append(msg.Records, &adminv1.BackupRecord{Name: r.Name, Connection: r.Connection, Tokens: r.Tokens})
		size += len(r.Name) + len(r.Connection) + len(r.Tokens)
		if size < backupChunk {
			return nil
		}
		return flush()
	})
	if err == nil {
		err = flush()
	}
	if err != nil {
		a.log.Warn("backup failed", "sent", sent, "error", err.Error())
		return adminError(err)
	}
	a.log.Info("backup sent", "connections", sent)
	return nil
}

// Rekey reseals every stale value, batch by batch, reporting after each.
func (a *adminService) Rekey(req *adminv1.RekeyRequest, ss grpc.ServerStreamingServer[adminv1.RekeyResponse]) error {
	ctx := ss.Context()
	limit := int(req.GetBatchSize())
	if limit <= 0 {
		limit = defaultRekeyBatch
	}
	if err := a.checkReplicas(ctx); err != nil {
		return err
	}
	keyID := a.store.SealingKeyIDs()[0]
	progress := &adminv1.RekeyResponse{SealingKeyId: keyID}
	after := ""
	pace := newPacer(rekeyPause)
	for {
		if err := pace.pause(ctx); err != nil {
			return adminError(err)
		}
		next, st, err := a.store.ResealBatch(ctx, after, limit)
		progress.Examined += st.Examined
		progress.Resealed += st.Resealed
		if err != nil {
			a.log.Warn("rekey failed", "resealed", progress.Resealed, "error", err.Error())
			return adminError(err)
		}
		if next == "" {
			break
		}
		if err := ss.Send(progress); err != nil {
			return err
		}
		after = next
	}
	use, err := a.store.KeyUse(ctx)
	if err != nil {
		return adminError(err)
	}
	progress.Remaining, progress.Done = use.Stale, true
	a.log.Info("rekey pass done", "key_id", keyID, "resealed", progress.Resealed, "remaining", use.Stale)
	return ss.Send(progress)
}

// checkReplicas refuses a rekey while a replica seals with another key:
// it would write values the new key's holders must still open with the
// old one, or (lacking the new key) fail to open what the rekey wrote.
func (a *adminService) checkReplicas(ctx context.Context) error {
	rl, ok := a.store.(ReplicaLister)
	if !ok {
		return nil
	}
	reps, err := rl.Replicas(ctx)
	if err != nil {
		return adminError(err)
	}
	want := a.store.SealingKeyIDs()[0]
	for _, r := range reps {
		if len(r.KeyIDs) == 0 || r.KeyIDs[0] != want {
			return status.Errorf(codes.FailedPrecondition,
				"replica %s seals with key id %s, not %s: restart every replica with the new key first in its key file, then rekey",
				r.ID, strings.Join(r.KeyIDs, ","), want)
		}
	}
	return nil
}

// GetKeyStatus counts the stored values per key.
func (a *adminService) GetKeyStatus(ctx context.Context, _ *adminv1.GetKeyStatusRequest) (*adminv1.GetKeyStatusResponse, error) {
	use, err := a.store.KeyUse(ctx)
	if err != nil {
		return nil, adminError(err)
	}
	ids := a.store.SealingKeyIDs()
	resp := &adminv1.GetKeyStatusResponse{
		SealingKeyId: ids[0], KeyIds: ids, Records: use.Records, RecordsNeedingOlderKeys: use.Stale,
	}
	for _, id := range ids {
		resp.KeyUses = append(resp.KeyUses, &adminv1.KeyUse{KeyId: id, Records: use.ByKey[id]})
	}
	for id, n := range use.ByKey {
		if !slices.Contains(ids, id) {
			resp.KeyUses = append(resp.KeyUses, &adminv1.KeyUse{KeyId: id, Records: n})
		}
	}
	if rl, ok := a.store.(ReplicaLister); ok {
		reps, err := rl.Replicas(ctx)
		if err != nil {
			return nil, adminError(err)
		}
		for _, r := range reps {
			resp.Replicas = append(resp.Replicas, &adminv1.Replica{Id: r.ID, KeyIds: r.KeyIDs})
		}
	}
	return resp, nil
}

// adminError maps a store failure to a status: the caller went away, a
// record that does not open, or the store unavailable.
func adminError(err error) error {
	switch {
	case errors.Is(err, context.Canceled):
		return status.Error(codes.Canceled, "canceled")
	case errors.Is(err, context.DeadlineExceeded):
		return status.Error(codes.DeadlineExceeded, "deadline exceeded")
	case errors.Is(err, storage.ErrWrongKey), errors.Is(err, storage.ErrNotDataFile):
		return status.Error(codes.DataLoss, fmt.Sprintf("stored data does not open: %v", err))
	}
	return status.Error(codes.Unavailable, fmt.Sprintf("store: %v", err))
}
