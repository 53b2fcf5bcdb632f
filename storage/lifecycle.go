package storage

import (
	"fmt"
	"slices"
	"time"

	"google.golang.org/protobuf/proto"
	"google.golang.org/protobuf/reflect/protoreflect"

	storagev1 "tokenbroker/gen/tokenbroker/storage/v1"
)

// Record is one connection as a backend stores it: its connection record
// and its token record (nil when it has none), both sealed. Backups and
// restores move Records without opening them.
type Record struct {
	Name       string
	Connection []byte
	Tokens     []byte
}

// Kind says which message a stored value holds.
type Kind int

// The kinds of stored values.
const (
	KindMeta Kind = iota
	KindConnection
	KindTokens
)

func (k Kind) message() proto.Message {
	switch k {
	case KindMeta:
		return &storagev1.Meta{}
	case KindConnection:
		return &storagev1.ConnectionRecord{}
	}
	return &storagev1.TokenRecord{}
}

// KeyIDs returns the ids of the keys that sealed the values in a stored
// value of kind k, each once, without opening anything. Every sealed
// value in the message counts, wherever it sits, so that a value sealed in
// a field added later is not missed.
func KeyIDs(k Kind, v []byte) ([]string, error) {
	m := k.message()
	if err := proto.Unmarshal(v, m); err != nil {
		return nil, fmt.Errorf("%w: %v", ErrNotDataFile, err)
	}
	var ids []string
	walkSealed(m.ProtoReflect(), func(s *storagev1.Sealed) {
		if !slices.Contains(ids, s.GetKeyId()) {
			ids = append(ids, s.GetKeyId())
		}
	})
	return ids, nil
}

// walkSealed calls fn for every Sealed message in m, at any depth.
func walkSealed(m protoreflect.Message, fn func(*storagev1.Sealed)) {
	if s, ok := m.Interface().(*storagev1.Sealed); ok {
		fn(s)
		return
	}
	m.Range(func(fd protoreflect.FieldDescriptor, v protoreflect.Value) bool {
		switch {
		case fd.Message() == nil || fd.IsMap():
		case fd.IsList():
			for i := range v.List().Len() {
				walkSealed(v.List().Get(i).Message(), fn)
			}
		default:
			walkSealed(v.Message(), fn)
		}
		return true
	})
}

// Stale reports whether a stored value of kind k has a value sealed with a
// key other than the sealing key: resealing it is what lets that key go.
func (cd *Codec) Stale(k Kind, v []byte) (bool, error) {
	ids, err := KeyIDs(k, v)
	if err != nil {
		return false, err
	}
	for _, id := range ids {
		if id != cd.keys.PrimaryID() {
			return true, nil
		}
	}
	return false, nil
}

// PrimaryID is the id of the key the codec seals with.
func (cd *Codec) PrimaryID() string { return cd.keys.PrimaryID() }

// Reseal checks a stored value of kind k stored under name (the where of
// [Codec.CheckMeta] for the meta record) and seals it again with the
// sealing key ([Codec.ResealConnection], [Codec.ResealTokens],
// [Codec.ResealMeta]). Nothing else changes: a connection keeps its
// revision, tokens their generation, the meta record its creation time.
func (cd *Codec) Reseal(k Kind, name string, v []byte) ([]byte, error) {
	switch k {
	case KindMeta:
		if err := cd.CheckMeta(name, v); err != nil {
			return nil, err
		}
		return cd.ResealMeta(v)
	case KindConnection:
		return cd.ResealConnection(name, v)
	}
	return cd.ResealTokens(name, v)
}

// IntentRestored is the intent a restore leaves on every token chain: the
// refresh token it restored may have been rotated since the backup, so the
// broker checks the chain (one refresh; one password grant if upstream
// rejects it) as it does after a stop with a token request in flight.
const IntentRestored = "restore"

// CheckRecord opens both records of r, as a restore does before writing
// anything.
func (cd *Codec) CheckRecord(r Record) error {
	if _, err := cd.DecodeConnection(r.Name, r.Connection); err != nil {
		return err
	}
	if r.Tokens == nil {
		return nil
	}
	_, err := cd.DecodeTokens(r.Name, r.Tokens)
	return err
}

// RestoredConnection returns r's connection record as a restore writes
// it: as stored when the sealing key sealed it, else sealed again with it
// (a backup taken before a key rotation), so that a restore leaves
// nothing for a rekey to do.
func (cd *Codec) RestoredConnection(r Record) ([]byte, error) {
	stale, err := cd.Stale(KindConnection, r.Connection)
	if err != nil || !stale {
		return r.Connection, err
	}
	return cd.Reseal(KindConnection, r.Name, r.Connection)
}

// RestoredTokens returns r's token record as a restore writes it: marked
// with [IntentRestored] unless it already holds an intent (a token request
// in flight when the backup was taken is checked the same way), sealed
// with the sealing key. A record without tokens gets empty ones.
func (cd *Codec) RestoredTokens(r Record, now time.Time) ([]byte, error) {
	t := &Tokens{}
	if r.Tokens != nil {
		var err error
		if t, err = cd.DecodeTokens(r.Name, r.Tokens); err != nil {
			return nil, err
		}
	}
	if t.IntentGrant == "" && (t.RefreshToken != "" || t.AccessToken != "") {
		t.IntentGeneration = t.Generation
		t.IntentGrant = IntentRestored
		t.IntentTime = now
	}
	return cd.EncodeTokens(r.Name, t)
}

// KeyUse counts stored values by the keys that sealed them: what decides
// whether an old key can leave the key file.
type KeyUse struct {
	// Records counts the stored values examined (meta, connection and token
	// records each count once).
	Records int64
	// ByKey counts, per key id, the values it sealed part of.
	ByKey map[string]int64
	// Stale counts the values with a part sealed by a key other than the
	// sealing key.
	Stale int64
}

// Add counts one stored value of kind k.
func (u *KeyUse) Add(cd *Codec, k Kind, v []byte) error {
	ids, err := KeyIDs(k, v)
	if err != nil {
		return err
	}
	if u.ByKey == nil {
		u.ByKey = map[string]int64{}
	}
	u.Records++
	stale := false
	for _, id := range ids {
		u.ByKey[id]++
		stale = stale || id != cd.keys.PrimaryID()
	}
	if stale {
		u.Stale++
	}
	return nil
}

// ResealStats counts one pass of resealing.
type ResealStats struct {
	Examined int64 // stored values looked at
	Resealed int64 // values written again with the sealing key
}

// SnapshotInfo describes a consistent snapshot of a store.
type SnapshotInfo struct {
	Store    string // "bbolt" or "etcd"
	Meta     []byte // the meta record, as stored
	Count    int64  // connections in the snapshot
	Revision int64  // the etcd revision it was read at; 0 for bbolt
}

// Replica is a running broker replica on a shared store and the key ids it
// holds, its sealing key first.
type Replica struct {
	ID     string
	KeyIDs []string
}

// SealingKeyIDs lists the codec's key ids, the sealing key first.
func (cd *Codec) SealingKeyIDs() []string { return cd.keys.IDs() }
