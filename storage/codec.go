package storage

import (
	"fmt"
	"time"

	"google.golang.org/protobuf/proto"
	"google.golang.org/protobuf/types/known/timestamppb"

	storagev1 "tokenbroker/gen/tokenbroker/storage/v1"
)

// FormatVersion is the record format this build writes, kept in every
// backend's meta record. Format 2 authenticates every record as a whole
// (see seal.go); format 1 sealed only the secrets. A store opening a file
// of format 1 upgrades it once with [Codec.UpgradeConnection] and
// [Codec.UpgradeTokens], then writes a meta record of format 2.
const FormatVersion = 2

// formatUnauthenticated is the last format whose records carry no record
// seal.
const formatUnauthenticated = 1

// Field names used as associated data when sealing.
const (
	fieldClientSecret = "client_secret"
	fieldPassword     = "password"
	fieldRefreshToken = "refresh_token"
	fieldAccessToken  = "access_token"
)

// Codec turns records into the bytes a backend stores and back: protobuf
// with storage's own messages, secrets and tokens sealed with its
// [Keyring] and bound to the connection's name and field. Backends store
// only what a Codec produced, so the sealing rules live here alone.
// A Codec is safe for concurrent use.
type Codec struct {
	keys *Keyring
}

// NewCodec returns a codec sealing with k.
func NewCodec(k *Keyring) *Codec { return &Codec{keys: k} }

// Rotating reports whether the keyring holds keys besides the sealing key,
// so that stored records may need resealing.
func (cd *Codec) Rotating() bool { return len(cd.keys.order) > 1 }

func ts(t time.Time) *timestamppb.Timestamp {
	if t.IsZero() {
		return nil
	}
	return timestamppb.New(t)
}

func fromTS(t *timestamppb.Timestamp) time.Time {
	if t == nil {
		return time.Time{}
	}
	return t.AsTime()
}

func marshal(m proto.Message) ([]byte, error) {
	return proto.MarshalOptions{Deterministic: true}.Marshal(m)
}

func (cd *Codec) encodeConnection(c *Connection) *storagev1.ConnectionRecord {
	return &storagev1.ConnectionRecord{
		Name:                    c.Name,
		DisplayName:             c.DisplayName,
		InstanceUrl:             c.InstanceURL,
		ClientId:                c.ClientID,
		ClientSecret:            cd.keys.sealString(c.ClientSecret, c.Name, fieldClientSecret),
		Username:                c.Username,
		Password:                cd.keys.sealString(c.Password, c.Name, fieldPassword),
		Scopes:                  c.Scopes,
		ClientSecretExpireTime:  ts(c.ClientSecretExpireTime),
		SlidingLifetimeSeconds:  int64(c.SlidingLifetime / time.Second),
		AbsoluteLifetimeSeconds: int64(c.AbsoluteLifetime / time.Second),
		CreateTime:              ts(c.CreateTime),
		UpdateTime:              ts(c.UpdateTime),
		Revision:                c.Revision,
		DeleteTime:              ts(c.DeleteTime),
		Flow:                    c.Flow,
		RedirectUri:             c.RedirectURI,
	}
}

func (cd *Codec) decodeConnection(key string, r *storagev1.ConnectionRecord) (*Connection, error) {
	if r.GetName() != key {
		return nil, fmt.Errorf("%w: record for %q stored under %q", ErrWrongKey, r.GetName(), key)
	}
	secret, err := cd.keys.openString(r.GetClientSecret(), key, fieldClientSecret)
	if err != nil {
		return nil, err
	}
	password, err := cd.keys.openString(r.GetPassword(), key, fieldPassword)
	if err != nil {
		return nil, err
	}
	return &Connection{
		Name:                   r.GetName(),
		DisplayName:            intern(r.GetDisplayName()),
		InstanceURL:            r.GetInstanceUrl(),
		ClientID:               intern(r.GetClientId()),
		ClientSecret:           secret,
		Username:               intern(r.GetUsername()),
		Password:               password,
		Scopes:                 internScopes(r.GetScopes()),
		ClientSecretExpireTime: fromTS(r.GetClientSecretExpireTime()),
		SlidingLifetime:        time.Duration(r.GetSlidingLifetimeSeconds()) * time.Second,
		AbsoluteLifetime:       time.Duration(r.GetAbsoluteLifetimeSeconds()) * time.Second,
		CreateTime:             fromTS(r.GetCreateTime()),
		UpdateTime:             fromTS(r.GetUpdateTime()),
		Revision:               r.GetRevision(),
		DeleteTime:             fromTS(r.GetDeleteTime()),
		Flow:                   intern(r.GetFlow()),
		RedirectURI:            r.GetRedirectUri(),
	}, nil
}

func (cd *Codec) encodeTokens(name string, t *Tokens) *storagev1.TokenRecord {
	return &storagev1.TokenRecord{
		Name:                  name,
		Generation:            t.Generation,
		RefreshToken:          cd.keys.sealString(t.RefreshToken, name, fieldRefreshToken),
		AccessToken:           cd.keys.sealString(t.AccessToken, name, fieldAccessToken),
		TokenType:             t.TokenType,
		AccessTokenExpireTime: ts(t.AccessTokenExpireTime),
		IssueTime:             ts(t.IssueTime),
		ChainStartTime:        ts(t.ChainStartTime),
		RefreshTokenUseTime:   ts(t.RefreshTokenUseTime),
		Scopes:                t.Scopes,
		State:                 t.State,
		StateReason:           t.StateReason,
		LastErrorCode:         t.LastErrorCode,
		LastErrorMessage:      t.LastErrorMessage,
		LastErrorTime:         ts(t.LastErrorTime),
		IntentGeneration:      t.IntentGeneration,
		IntentGrant:           t.IntentGrant,
		IntentTime:            ts(t.IntentTime),
	}
}

func (cd *Codec) decodeTokens(key string, r *storagev1.TokenRecord) (*Tokens, error) {
	if r.GetName() != key {
		return nil, fmt.Errorf("%w: record for %q stored under %q", ErrWrongKey, r.GetName(), key)
	}
	refresh, err := cd.keys.openString(r.GetRefreshToken(), key, fieldRefreshToken)
	if err != nil {
		return nil, err
	}
	access, err := cd.keys.openString(r.GetAccessToken(), key, fieldAccessToken)
	if err != nil {
		return nil, err
	}
	return &Tokens{
		Generation:            r.GetGeneration(),
		RefreshToken:          refresh,
		AccessToken:           access,
		TokenType:             intern(r.GetTokenType()),
		AccessTokenExpireTime: fromTS(r.GetAccessTokenExpireTime()),
		IssueTime:             fromTS(r.GetIssueTime()),
		ChainStartTime:        fromTS(r.GetChainStartTime()),
		RefreshTokenUseTime:   fromTS(r.GetRefreshTokenUseTime()),
		Scopes:                internScopes(r.GetScopes()),
		State:                 intern(r.GetState()),
		StateReason:           r.GetStateReason(),
		LastErrorCode:         intern(r.GetLastErrorCode()),
		LastErrorMessage:      r.GetLastErrorMessage(),
		LastErrorTime:         fromTS(r.GetLastErrorTime()),
		IntentGeneration:      r.GetIntentGeneration(),
		IntentGrant:           intern(r.GetIntentGrant()),
		IntentTime:            fromTS(r.GetIntentTime()),
	}, nil
}

// DecodeConnection checks, decodes and unseals a connection record stored
// under name. A record moved from another name does not open
// ([ErrWrongKey]); one changed without the key fails with [ErrTampered],
// naming the connection.
func (cd *Codec) DecodeConnection(name string, v []byte) (*Connection, error) {
	r, err := cd.checkedConnection(name, v, true)
	if err != nil {
		return nil, err
	}
	return cd.decodeConnection(name, r)
}

// DecodeTokens checks, decodes and unseals a token record stored under name.
func (cd *Codec) DecodeTokens(name string, v []byte) (*Tokens, error) {
	r, err := cd.checkedTokens(name, v, true)
	if err != nil {
		return nil, err
	}
	return cd.decodeTokens(name, r)
}

// checkedConnection parses v and checks its record seal; with authenticated
// false (a file of format 1) a record without one is taken as it is.
func (cd *Codec) checkedConnection(name string, v []byte, authenticated bool) (*storagev1.ConnectionRecord, error) {
	var r storagev1.ConnectionRecord
	if err := proto.Unmarshal(v, &r); err != nil {
		return nil, fmt.Errorf("%w: connection record of %q: %v", ErrNotDataFile, name, err)
	}
	if !authenticated && r.GetRecordSeal() == nil {
		return &r, nil
	}
	if err := cd.checkRecord(v, r.GetRecordSeal(), name, kindConnection, connectionSealField); err != nil {
		return nil, err
	}
	return &r, nil
}

func (cd *Codec) checkedTokens(name string, v []byte, authenticated bool) (*storagev1.TokenRecord, error) {
	var r storagev1.TokenRecord
	if err := proto.Unmarshal(v, &r); err != nil {
		return nil, fmt.Errorf("%w: token record of %q: %v", ErrNotDataFile, name, err)
	}
	if !authenticated && r.GetRecordSeal() == nil {
		return &r, nil
	}
	if err := cd.checkRecord(v, r.GetRecordSeal(), name, kindTokens, tokenSealField); err != nil {
		return nil, err
	}
	return &r, nil
}

// EncodeConnection seals and encodes c as it is (its Revision included),
// ready to store.
func (cd *Codec) EncodeConnection(c *Connection) ([]byte, error) {
	return cd.sealRecord(cd.encodeConnection(c), c.Name, kindConnection, connectionSealField)
}

// EncodeTokens seals and encodes name's token state, ready to store.
func (cd *Codec) EncodeTokens(name string, t *Tokens) ([]byte, error) {
	return cd.sealRecord(cd.encodeTokens(name, t), name, kindTokens, tokenSealField)
}

// EncodeRecords encodes a copy of c at revision rev and, when t is not nil,
// its token state (tv is nil otherwise), ready to store. It returns the
// copy, which is what the caller hands back once the write is durable.
func (cd *Codec) EncodeRecords(c *Connection, rev int64, t *Tokens) (stored *Connection, cv, tv []byte, err error) {
	c = c.Clone()
	c.Revision = rev
	if cv, err = cd.EncodeConnection(c); err != nil {
		return nil, nil, nil, err
	}
	if t != nil {
		if tv, err = cd.EncodeTokens(c.Name, t); err != nil {
			return nil, nil, nil, err
		}
	}
	return c, cv, tv, nil
}

// MarkDeleting decodes the connection record v stored under name, checks
// that its Revision equals revision (unless revision is 0) and returns it
// encoded again with DeleteTime set to now: the record a backend keeps
// aside while a delete is under way.
func (cd *Codec) MarkDeleting(name string, v []byte, revision int64, now time.Time) ([]byte, error) {
	c, err := cd.DecodeConnection(name, v)
	if err != nil {
		return nil, err
	}
	if revision != 0 && c.Revision != revision {
		return nil, fmt.Errorf("%w: %s is at revision %d, not %d", ErrConflict, name, c.Revision, revision)
	}
	c.DeleteTime = now
	return cd.EncodeConnection(c)
}

// ConnectionNeedsReseal reports whether a stored connection record holds
// anything sealed with a key other than the sealing key. It does not check
// the record; [Codec.ResealConnection] does.
func (cd *Codec) ConnectionNeedsReseal(v []byte) bool {
	var r storagev1.ConnectionRecord
	if proto.Unmarshal(v, &r) != nil {
		return false
	}
	k := cd.keys
	return !k.current(r.GetRecordSeal()) || !k.current(r.GetClientSecret()) || !k.current(r.GetPassword())
}

// TokensNeedsReseal is [Codec.ConnectionNeedsReseal] for a token record.
func (cd *Codec) TokensNeedsReseal(v []byte) bool {
	var r storagev1.TokenRecord
	if proto.Unmarshal(v, &r) != nil {
		return false
	}
	k := cd.keys
	return !k.current(r.GetRecordSeal()) || !k.current(r.GetRefreshToken()) || !k.current(r.GetAccessToken())
}

// ResealConnection checks the connection record v stored under name and
// returns it sealed anew with the sealing key, unchanged otherwise (its
// revision included): what a key rotation needs written back.
func (cd *Codec) ResealConnection(name string, v []byte) ([]byte, error) {
	return cd.recodeConnection(name, v, true)
}

// ResealTokens is [Codec.ResealConnection] for a token record.
func (cd *Codec) ResealTokens(name string, v []byte) ([]byte, error) {
	return cd.recodeTokens(name, v, true)
}

// UpgradeConnection is [Codec.ResealConnection] for a file of format 1: a
// record without a record seal, as that format wrote them, is taken as it
// is and comes back authenticated. Only a store upgrading such a file calls
// it, once, before writing the meta record of the current format.
func (cd *Codec) UpgradeConnection(name string, v []byte) ([]byte, error) {
	return cd.recodeConnection(name, v, false)
}

// UpgradeTokens is [Codec.UpgradeConnection] for a token record.
func (cd *Codec) UpgradeTokens(name string, v []byte) ([]byte, error) {
	return cd.recodeTokens(name, v, false)
}

func (cd *Codec) recodeConnection(name string, v []byte, authenticated bool) ([]byte, error) {
	r, err := cd.checkedConnection(name, v, authenticated)
	if err != nil {
		return nil, err
	}
	c, err := cd.decodeConnection(name, r)
	if err != nil {
		return nil, err
	}
	return cd.EncodeConnection(c)
}

func (cd *Codec) recodeTokens(name string, v []byte, authenticated bool) ([]byte, error) {
	r, err := cd.checkedTokens(name, v, authenticated)
	if err != nil {
		return nil, err
	}
	t, err := cd.decodeTokens(name, r)
	if err != nil {
		return nil, err
	}
	return cd.EncodeTokens(name, t)
}

// Revision reads the revision of a stored connection record without
// unsealing it, for a backend's compare-before-write.
func Revision(v []byte) (int64, error) {
	var r storagev1.ConnectionRecord
	if err := proto.Unmarshal(v, &r); err != nil {
		return 0, fmt.Errorf("%w: connection record: %v", ErrNotDataFile, err)
	}
	return r.GetRevision(), nil
}

// canaryAAD binds the canary to its one place.
const canaryAAD = "meta\x00canary"

// EncodeMeta returns a new meta record: the format version and a canary
// sealed with the current key, so that a later open with another key is
// refused before anything is read or written.
func (cd *Codec) EncodeMeta(now time.Time) ([]byte, error) {
	return cd.encodeMeta(timestamppb.New(now))
}

func (cd *Codec) encodeMeta(created *timestamppb.Timestamp) ([]byte, error) {
	return marshal(&storagev1.Meta{
		Format:      FormatVersion,
		CanaryKeyId: cd.keys.PrimaryID(),
		Canary:      cd.keys.seal(canaryPlain, canaryAAD),
		CreateTime:  created,
	})
}

// MetaStatus is what a stored meta record asks of the store opening it.
type MetaStatus struct {
	// Upgrade is set for a file of format 1: its records carry no record
	// seal and are upgraded (see [Codec.UpgradeConnection]) before the
	// meta record is rewritten.
	Upgrade bool
	// Reseal is set when the meta record must be rewritten with
	// [Codec.ResealMeta]: its canary was sealed with an older key, or its
	// format is older.
	Reseal bool
}

// CheckMeta checks the meta record stored at where (a file's path, an
// etcd prefix): [ErrNotDataFile] when it is not one of a format this build
// reads, [ErrWrongKey] when the keyring cannot open its canary.
func (cd *Codec) CheckMeta(where string, v []byte) error {
	_, err := cd.OpenMeta(where, v)
	return err
}

// OpenMeta is [Codec.CheckMeta] that also says what the store must do
// before it serves.
func (cd *Codec) OpenMeta(where string, v []byte) (MetaStatus, error) {
	var meta storagev1.Meta
	if err := proto.Unmarshal(v, &meta); err != nil {
		return MetaStatus{}, fmt.Errorf("%w: %s: meta record: %v", ErrNotDataFile, where, err)
	}
	if f := meta.GetFormat(); f != FormatVersion && f != formatUnauthenticated {
		return MetaStatus{}, fmt.Errorf("%w: %s has record format %d, this build reads %d and %d", ErrNotDataFile, where, f, formatUnauthenticated, FormatVersion)
	}
	if err := cd.keys.checkCanary(meta.GetCanary()); err != nil {
		return MetaStatus{}, fmt.Errorf("%w: %s was sealed with key id %s; the key file holds %v", ErrWrongKey, where, meta.GetCanaryKeyId(), cd.keys.IDs())
	}
	upgrade := meta.GetFormat() == formatUnauthenticated
	return MetaStatus{Upgrade: upgrade, Reseal: upgrade || !cd.keys.current(meta.GetCanary())}, nil
}

// ResealMeta returns the meta record v (already checked) with its canary
// sealed anew with the sealing key and the current format, keeping its
// creation time.
func (cd *Codec) ResealMeta(v []byte) ([]byte, error) {
	var meta storagev1.Meta
	if err := proto.Unmarshal(v, &meta); err != nil {
		return nil, fmt.Errorf("%w: meta record: %v", ErrNotDataFile, err)
	}
	return cd.encodeMeta(meta.GetCreateTime())
}
