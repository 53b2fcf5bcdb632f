package storage

import (
	"bytes"
	"testing"

	"google.golang.org/protobuf/proto"
)

// FuzzDecodeRecords feeds arbitrary bytes to the record decoders: they must
// fail cleanly, never panic.
func FuzzDecodeRecords(f *testing.F) {
	k, _ := NewKeyring(bytes.Repeat([]byte{1}, KeySize))
	c := &Connection{Name: "tenants/a/connections/b", ClientSecret: "s", Password: "p", Scopes: []string{"api"}}
	cv, _ := proto.Marshal(k.encodeConnection(c))
	tv, _ := proto.Marshal(k.encodeTokens(c.Name, &Tokens{RefreshToken: "r", AccessToken: "a"}))
	f.Add(cv)
	f.Add(tv)
	f.Add([]byte{0xff, 0x01})
	s := &BoltStore{keys: k}
	f.Fuzz(func(t *testing.T, v []byte) {
		s.decodeConnection([]byte("tenants/a/connections/b"), v)
		s.decodeTokens([]byte("tenants/a/connections/b"), v)
	})
}
