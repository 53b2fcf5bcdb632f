package storage

import (
	"fmt"
	"time"

	"google.golang.org/protobuf/proto"
	"google.golang.org/protobuf/types/known/timestamppb"

	storagev1 "tokenbroker/gen/tokenbroker/storage/v1"
)

// Field names used as associated data when sealing.
const (
	fieldClientSecret = "client_secret"
	fieldPassword     = "password"
	fieldRefreshToken = "refresh_token"
	fieldAccessToken  = "access_token"
)

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

func (k *Keyring) encodeConnection(c *Connection) *storagev1.ConnectionRecord {
	return &storagev1.ConnectionRecord{
		Name:                    c.Name,
		DisplayName:             c.DisplayName,
		InstanceUrl:             c.InstanceURL,
		ClientId:                c.ClientID,
		ClientSecret:            k.sealString(c.ClientSecret, c.Name, fieldClientSecret),
		Username:                c.Username,
		Password:                k.sealString(c.Password, c.Name, fieldPassword),
		Scopes:                  c.Scopes,
		ClientSecretExpireTime:  ts(c.ClientSecretExpireTime),
		SlidingLifetimeSeconds:  int64(c.SlidingLifetime / time.Second),
		AbsoluteLifetimeSeconds: int64(c.AbsoluteLifetime / time.Second),
		CreateTime:              ts(c.CreateTime),
		UpdateTime:              ts(c.UpdateTime),
		Revision:                c.Revision,
	}
}

func (k *Keyring) decodeConnection(key string, r *storagev1.ConnectionRecord) (*Connection, error) {
	if r.GetName() != key {
		return nil, fmt.Errorf("%w: record for %q stored under %q", ErrWrongKey, r.GetName(), key)
	}
	secret, err := k.openString(r.GetClientSecret(), key, fieldClientSecret)
	if err != nil {
		return nil, err
	}
	password, err := k.openString(r.GetPassword(), key, fieldPassword)
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

func (k *Keyring) encodeTokens(name string, t *Tokens) *storagev1.TokenRecord {
	return &storagev1.TokenRecord{
		Name:                  name,
		Generation:            t.Generation,
		RefreshToken:          k.sealString(t.RefreshToken, name, fieldRefreshToken),
		AccessToken:           k.sealString(t.AccessToken, name, fieldAccessToken),
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

func (k *Keyring) decodeTokens(key string, r *storagev1.TokenRecord) (*Tokens, error) {
	if r.GetName() != key {
		return nil, fmt.Errorf("%w: record for %q stored under %q", ErrWrongKey, r.GetName(), key)
	}
	refresh, err := k.openString(r.GetRefreshToken(), key, fieldRefreshToken)
	if err != nil {
		return nil, err
	}
	access, err := k.openString(r.GetAccessToken(), key, fieldAccessToken)
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

// unmarshalConnection decodes a stored connection record kept under name.
func (k *Keyring) unmarshalConnection(name string, v []byte) (*Connection, error) {
	var r storagev1.ConnectionRecord
	if err := proto.Unmarshal(v, &r); err != nil {
		return nil, fmt.Errorf("%w: connection record: %v", ErrNotDataFile, err)
	}
	return k.decodeConnection(name, &r)
}

// unmarshalTokens decodes a stored token record kept under name.
func (k *Keyring) unmarshalTokens(name string, v []byte) (*Tokens, error) {
	var r storagev1.TokenRecord
	if err := proto.Unmarshal(v, &r); err != nil {
		return nil, fmt.Errorf("%w: token record: %v", ErrNotDataFile, err)
	}
	return k.decodeTokens(name, &r)
}

// sealRecords encodes a copy of c at revision rev and, when t is not nil,
// its token state, ready to store. It returns the copy.
func (k *Keyring) sealRecords(c *Connection, rev int64, t *Tokens) (*Connection, []byte, []byte, error) {
	c = c.Clone()
	c.Revision = rev
	cv, err := marshal(k.encodeConnection(c))
	if err != nil {
		return nil, nil, nil, err
	}
	var tv []byte
	if t != nil {
		if tv, err = marshal(k.encodeTokens(c.Name, t)); err != nil {
			return nil, nil, nil, err
		}
	}
	return c, cv, tv, nil
}
