package storage

import (
	"bytes"
	"errors"
	"testing"

	"google.golang.org/protobuf/encoding/protowire"
)

// TestEveryByteOfARecordIsAuthenticated changes each byte of stored
// records in turn: none of the changed records opens.
func TestEveryByteOfARecordIsAuthenticated(t *testing.T) {
	k, _ := NewKeyring(bytes.Repeat([]byte{1}, KeySize))
	cd := NewCodec(k)
	const name = "tenants/a/connections/b"
	c := &Connection{Name: name, InstanceURL: "https://erp.example.com", ClientID: "G@T", ClientSecret: "s",
		Username: "u", Password: "p", Scopes: []string{"api"}}
	_, cv, tv, err := cd.EncodeRecords(c, 1, &Tokens{RefreshToken: "r", AccessToken: "a", TokenType: "Bearer", Scopes: []string{"api"}})
	if err != nil {
		t.Fatal(err)
	}
	for _, rec := range []struct {
		kind   string
		v      []byte
		decode func([]byte) error
	}{
		{"connection", cv, func(v []byte) error { _, err := cd.DecodeConnection(name, v); return err }},
		{"tokens", tv, func(v []byte) error { _, err := cd.DecodeTokens(name, v); return err }},
	} {
		if err := rec.decode(rec.v); err != nil {
			t.Fatalf("%s: %v", rec.kind, err)
		}
		for i := range rec.v {
			v := bytes.Clone(rec.v)
			v[i] ^= 0x01
			err := rec.decode(v)
			if err == nil {
				t.Errorf("%s with byte %d changed opens", rec.kind, i)
			} else if !errors.Is(err, ErrTampered) && !errors.Is(err, ErrNotDataFile) && !errors.Is(err, ErrWrongKey) {
				t.Errorf("%s with byte %d changed: %v", rec.kind, i, err)
			}
		}
	}
}

// TestWithoutFieldTakesAPrefixOrCopies checks the two ways of removing the
// seal field agree.
func TestWithoutFieldTakesAPrefixOrCopies(t *testing.T) {
	var body []byte
	body = protowire.AppendTag(body, 1, protowire.BytesType)
	body = protowire.AppendString(body, "tenants/a/connections/b")
	body = protowire.AppendTag(body, 14, protowire.VarintType)
	body = protowire.AppendVarint(body, 7)
	var seal []byte
	seal = protowire.AppendTag(seal, connectionSealField, protowire.BytesType)
	seal = protowire.AppendBytes(seal, []byte("seal"))
	for _, v := range [][]byte{
		append(bytes.Clone(body), seal...),
		append(bytes.Clone(seal), body...),
		append(append(bytes.Clone(body), seal...), seal...),
	} {
		got, err := withoutField(v, connectionSealField)
		if err != nil || !bytes.Equal(got, body) {
			t.Errorf("withoutField(%x) = %x, %v; want %x", v, got, err, body)
		}
	}
}

// BenchmarkRecordCheck prices the record seal check against the whole
// decode of a token record it is part of, in one run: compare the ns/op of
// check with decode.
func BenchmarkRecordCheck(b *testing.B) {
	k, _ := NewKeyring(bytes.Repeat([]byte{1}, KeySize))
	cd := NewCodec(k)
	const name = "tenants/t000001/connections/erp"
	tv, err := cd.EncodeTokens(name, &Tokens{RefreshToken: "r", AccessToken: string(bytes.Repeat([]byte("a"), 900)), TokenType: "Bearer"})
	if err != nil {
		b.Fatal(err)
	}
	r, err := cd.checkedTokens(name, tv, true)
	if err != nil {
		b.Fatal(err)
	}
	b.Run("decode", func(b *testing.B) {
		b.ReportAllocs()
		for range b.N {
			if _, err := cd.DecodeTokens(name, bytes.Clone(tv)); err != nil {
				b.Fatal(err)
			}
		}
	})
	b.Run("check", func(b *testing.B) {
		b.ReportAllocs()
		for range b.N {
			if err := cd.checkRecord(tv, r.GetRecordSeal(), name, kindTokens, tokenSealField); err != nil {
				b.Fatal(err)
			}
		}
	})
}
