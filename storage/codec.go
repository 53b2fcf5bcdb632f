package storage

import (
	"fmt"
	"time"

	"google.golang.org/protobuf/proto"
	"google.golang.org/protobuf/types/known/timestamppb"

	storagev1 "tokenbroker/gen/tokenbroker/storage/v1"
)

// FormatVersion is the record format this build reads and writes, kept in
// every backend's meta record.
const FormatVersion = 1

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

// DecodeConnection decodes and unseals a connection record stored under
// name. A record moved from another name does not open ([ErrWrongKey]).
func (cd *Codec) DecodeConnection(name string, v []byte) (*Connection, error) {
	var r storagev1.ConnectionRecord
	if err := proto.Unmarshal(v, &r); err != nil {
		return nil, fmt.Errorf("%w: connection record: %v", ErrNotDataFile, err)
	}
	return cd.decodeConnection(name, &r)
}

// DecodeTokens decodes and unseals a token record stored under name.
func (cd *Codec) DecodeTokens(name string, v []byte) (*Tokens, error) {
	var r storagev1.TokenRecord
	if err := proto.Unmarshal(v, &r); err != nil {
		return nil, fmt.Errorf("%w: token record: %v", ErrNotDataFile, err)
	}
	return cd.decodeTokens(name, &r)
}

// EncodeTokens seals and encodes name's token state, ready to store.
func (cd *Codec) EncodeTokens(name string, t *Tokens) ([]byte, error) {
	return marshal(cd.encodeTokens(name, t))
}

// EncodeRecords encodes a copy of c at revision rev and, when t is not nil,
// its token state (tv is nil otherwise), ready to store. It returns the
// copy, which is what the caller hands back once the write is durable.
func (cd *Codec) EncodeRecords(c *Connection, rev int64, t *Tokens) (stored *Connection, cv, tv []byte, err error) {
	c = c.Clone()
	c.Revision = rev
	if cv, err = marshal(cd.encodeConnection(c)); err != nil {
		return nil, nil, nil, err
	}
	if t != nil {
		if tv, err = marshal(cd.encodeTokens(c.Name, t)); err != nil {
			return nil, nil, nil, err
		}
	}
	return c, cv, tv, nil
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
	return marshal(&storagev1.Meta{
		Format:      FormatVersion,
		CanaryKeyId: cd.keys.PrimaryID(),
		Canary:      cd.keys.seal(canaryPlain, canaryAAD),
		CreateTime:  timestamppb.New(now),
	})
}

// CheckMeta checks the meta record stored at where (a file's path, an
// etcd prefix): [ErrNotDataFile] when it is not one of this format,
// [ErrWrongKey] when the keyring cannot open its canary.
func (cd *Codec) CheckMeta(where string, v []byte) error {
	var meta storagev1.Meta
	if err := proto.Unmarshal(v, &meta); err != nil {
		return fmt.Errorf("%w: %s: meta record: %v", ErrNotDataFile, where, err)
	}
	if meta.GetFormat() != FormatVersion {
		return fmt.Errorf("%w: %s has record format %d, this build reads %d", ErrNotDataFile, where, meta.GetFormat(), FormatVersion)
	}
	if err := cd.keys.checkCanary(meta.GetCanary()); err != nil {
		return fmt.Errorf("%w: %s was sealed with key id %s; the key file holds %v", ErrWrongKey, where, meta.GetCanaryKeyId(), cd.keys.IDs())
	}
	return nil
}
