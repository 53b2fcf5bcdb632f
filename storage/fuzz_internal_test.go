package storage

import (
	"bytes"
	"testing"
)

// FuzzDecodeRecords feeds arbitrary bytes to the record decoders: they must
// fail cleanly, never panic.
func FuzzDecodeRecords(f *testing.F) {
	k, _ := NewKeyring(bytes.Repeat([]byte{1}, KeySize))
	cd := NewCodec(k)
	c := &Connection{Name: "tenants/a/connections/b", ClientSecret: "s", Password: "p", Scopes: []string{"api"}}
	_, cv, tv, _ := cd.EncodeRecords(c, 1, &Tokens{RefreshToken: "r", AccessToken: "a"})
	f.Add(cv)
	f.Add(tv)
	f.Add([]byte{0xff, 0x01})
	f.Fuzz(func(t *testing.T, v []byte) {
		cd.DecodeConnection("tenants/a/connections/b", v)
		cd.DecodeTokens("tenants/a/connections/b", v)
		Revision(v)
		cd.CheckMeta("fuzz", v)
	})
}
