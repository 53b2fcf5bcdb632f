package storage

import (
	"fmt"

	"google.golang.org/protobuf/proto"

	storagev1 "tokenbroker/gen/tokenbroker/storage/v1"
)

// fieldVerifier is the associated-data field name of a sealed PKCE
// verifier.
const fieldVerifier = "code_verifier"

// EncodeAuthorization seals and encodes a pending authorization to be
// stored under key (the hash of its state): the record is authenticated
// as a whole and bound to key, its secrets (the client secret, the
// verifier) sealed.
func (cd *Codec) EncodeAuthorization(key string, a *Authorization) ([]byte, error) {
	r := &storagev1.AuthorizationRecord{
		Name:         a.Name,
		Connection:   cd.encodeConnection(a.Conn),
		Existing:     a.Existing,
		Etag:         a.ETag,
		CodeVerifier: cd.keys.sealString(a.Verifier, key, fieldVerifier),
		ExpireTime:   ts(a.ExpireTime),
	}
	return cd.sealRecord(r, key, kindAuthorization, authorizationSealField)
}

// DecodeAuthorization checks, decodes and unseals a pending authorization
// stored under key.
func (cd *Codec) DecodeAuthorization(key string, v []byte) (*Authorization, error) {
	var r storagev1.AuthorizationRecord
	if err := proto.Unmarshal(v, &r); err != nil {
		return nil, fmt.Errorf("%w: authorization record: %v", ErrNotDataFile, err)
	}
	if err := cd.checkRecord(v, r.GetRecordSeal(), key, kindAuthorization, authorizationSealField); err != nil {
		return nil, err
	}
	conn, err := cd.decodeConnection(r.GetName(), r.GetConnection())
	if err != nil {
		return nil, err
	}
	verifier, err := cd.keys.openString(r.GetCodeVerifier(), key, fieldVerifier)
	if err != nil {
		return nil, err
	}
	return &Authorization{Name: r.GetName(), Conn: conn, Existing: r.GetExisting(), ETag: r.GetEtag(),
		Verifier: verifier, ExpireTime: fromTS(r.GetExpireTime())}, nil
}
