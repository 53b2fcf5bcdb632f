package server

import (
	"testing"

	"google.golang.org/grpc/mem"
	"google.golang.org/protobuf/proto"

	pb "tokenbroker/gen/tokenbroker/v1"
)

// FuzzUTF8Codec: whatever bytes arrive, the codec does not panic, and a
// message it decodes holds valid UTF-8 only (it encodes again), with the
// bad fields named when protobuf alone would have refused it.
func FuzzUTF8Codec(f *testing.F) {
	good, _ := proto.Marshal(&pb.CreateConnectionRequest{Parent: "tenants/acme", ConnectionId: "erp",
		Connection: &pb.Connection{ClientId: "AAAA", Scopes: []string{"api", "BBBB"}}})
	f.Add(good)
	bad := append([]byte(nil), good...)
	for i := range bad {
		if bad[i] == 'A' || bad[i] == 'B' {
			bad[i] = 0xff
		}
	}
	f.Add(bad)
	f.Add([]byte{0x0a, 0x02, 0xc3, 0x28})
	c := newUTF8Codec()
	f.Fuzz(func(t *testing.T, data []byte) {
		var m pb.CreateConnectionRequest
		err := c.Unmarshal(mem.BufferSlice{mem.SliceBuffer(data)}, &m)
		if err != nil {
			return
		}
		if _, err := proto.Marshal(&m); err != nil {
			t.Fatalf("decoded a message that does not encode: %v", err)
		}
		if proto.Unmarshal(data, new(pb.CreateConnectionRequest)) != nil && len(badUTF8Paths(&m)) == 0 {
			t.Fatalf("a message protobuf refuses decoded with no bad field named")
		}
	})
}
