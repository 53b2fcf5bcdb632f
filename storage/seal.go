package storage

import (
	"fmt"
	"strings"
	"sync"

	"google.golang.org/protobuf/encoding/protowire"
	"google.golang.org/protobuf/proto"

	storagev1 "tokenbroker/gen/tokenbroker/storage/v1"
)

// A stored record is authenticated as a whole: its bytes, all fields but
// the seal, are the associated data of an AEAD seal of an empty plaintext
// under the data key, appended to the record as its record_seal field. The
// check runs over the bytes exactly as stored (never a re-encoding, which
// a newer protobuf library could lay out differently), so whoever changes
// any byte of a field that steers a request (the instance URL, the client
// id, the username, the scopes) without the key makes the record refuse to
// open.

// Field numbers of record_seal in the record messages.
const (
	connectionSealField    protowire.Number = 15
	tokenSealField         protowire.Number = 19
	authorizationSealField protowire.Number = 7
)

// Kinds of record, bound into the associated data so that one kind's seal
// never vouches for another's bytes.
const (
	kindConnection    = "connection_record"
	kindTokens        = "token_record"
	kindAuthorization = "authorization_record"
)

// aadBufs recycles the associated data of record checks: a start checks
// two records per connection, and each would otherwise be garbage.
var aadBufs = sync.Pool{New: func() any { return new([]byte) }}

func recordAAD(name, kind string, body []byte) []byte {
	return appendRecordAAD(make([]byte, 0, len(name)+len(kind)+2+len(body)), name, kind, body)
}

func appendRecordAAD(aad []byte, name, kind string, body []byte) []byte {
	aad = append(aad, name...)
	aad = append(aad, 0)
	aad = append(aad, kind...)
	aad = append(aad, 0)
	return append(aad, body...)
}

// sealRecord marshals m (whose record_seal is unset) and appends its seal.
func (cd *Codec) sealRecord(m proto.Message, name, kind string, field protowire.Number) ([]byte, error) {
	body, err := marshal(m)
	if err != nil {
		return nil, err
	}
	seal, err := marshal(cd.keys.sealAAD(nil, recordAAD(name, kind, body)))
	if err != nil {
		return nil, err
	}
	out := protowire.AppendTag(body, field, protowire.BytesType)
	return protowire.AppendBytes(out, seal), nil
}

// checkRecord checks seal against the stored bytes v, all but the seal.
func (cd *Codec) checkRecord(v []byte, seal *storagev1.Sealed, name, kind string, field protowire.Number) error {
	body, err := withoutField(v, field)
	if err != nil {
		return fmt.Errorf("%w: %s record of %q: %v", ErrNotDataFile, kind, name, err)
	}
	if _, known := cd.keys.aeads[seal.GetKeyId()]; seal != nil && !known {
		return fmt.Errorf("%w: the %s of %q was sealed with key id %s, which the key file does not hold (it holds %v)", ErrWrongKey, strings.ReplaceAll(kind, "_", " "), name, seal.GetKeyId(), cd.keys.IDs())
	}
	buf := aadBufs.Get().(*[]byte)
	*buf = appendRecordAAD((*buf)[:0], name, kind, body)
	_, err = cd.keys.openAAD(seal, *buf)
	aadBufs.Put(buf)
	if err != nil {
		return tampered(name, kind, seal)
	}
	return nil
}

// tampered is the error for a record whose seal does not check. It names
// the connection and says what to do; it never quotes the record.
func tampered(name, kind string, seal *storagev1.Sealed) error {
	what := strings.ReplaceAll(kind, "_", " ")
	if seal == nil {
		return fmt.Errorf("%w: the %s of %q carries no seal: it was changed without the data key and is not used; restore it from a backup", ErrTampered, what, name)
	}
	return fmt.Errorf("%w: the %s of %q does not check with key id %s: it was changed without the data key and is not used; restore it from a backup", ErrTampered, what, name, seal.GetKeyId())
}

// withoutField returns v with every occurrence of field removed: a prefix
// of v, not a copy, when field is only at the end (as sealRecord puts it).
func withoutField(v []byte, field protowire.Number) ([]byte, error) {
	if at, ok := trailing(v, field); ok {
		return v[:at], nil
	}
	out := make([]byte, 0, len(v))
	for rest := v; len(rest) > 0; {
		num, typ, n := protowire.ConsumeTag(rest)
		if n < 0 {
			return nil, protowire.ParseError(n)
		}
		m := protowire.ConsumeFieldValue(num, typ, rest[n:])
		if m < 0 {
			return nil, protowire.ParseError(m)
		}
		if num != field {
			out = append(out, rest[:n+m]...)
		}
		rest = rest[n+m:]
	}
	return out, nil
}

// trailing reports where field starts when it occurs once, as v's last
// field.
func trailing(v []byte, field protowire.Number) (int, bool) {
	at, seen := -1, 0
	for off := 0; off < len(v); {
		num, typ, n := protowire.ConsumeTag(v[off:])
		if n < 0 {
			return 0, false
		}
		m := protowire.ConsumeFieldValue(num, typ, v[off+n:])
		if m < 0 {
			return 0, false
		}
		if num == field {
			at, seen = off, seen+1
		}
		off += n + m
		if num == field && off != len(v) {
			return 0, false
		}
	}
	return at, seen == 1
}
