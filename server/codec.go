package server

import (
	"strconv"
	"strings"
	"unicode/utf8"

	"google.golang.org/grpc/encoding"
	"google.golang.org/grpc/encoding/proto"
	"google.golang.org/grpc/mem"
	"google.golang.org/protobuf/encoding/protowire"
	protov2 "google.golang.org/protobuf/proto"
	"google.golang.org/protobuf/reflect/protoreflect"
)

// badUTF8Field is the unknown field in which [utf8Codec] hands the paths of
// string fields that held invalid UTF-8 to the validator. Its number is the
// highest a field may have; no API message uses it.
const badUTF8Field protowire.Number = protowire.MaxValidNumber

// utf8Codec is the proto codec, except that a request with invalid UTF-8 in
// a string field still decodes: protobuf refuses such a message, and gRPC
// would answer INTERNAL before any interceptor saw it. The bad strings are
// decoded with U+FFFD in place of each bad byte, and the fields' paths are
// left in the message's unknown field badUTF8Field, where the validator
// finds them and answers INVALID_ARGUMENT naming each field.
type utf8Codec struct {
	encoding.CodecV2
}

func newUTF8Codec() utf8Codec {
	return utf8Codec{encoding.GetCodecV2(proto.Name)}
}

func (c utf8Codec) Unmarshal(data mem.BufferSlice, v any) error {
	err := c.CodecV2.Unmarshal(data, v)
	m, ok := v.(protov2.Message)
	if err == nil || !ok {
		return err
	}
	raw := data.Materialize()
	fixed, paths, ok := validUTF8(raw, m.ProtoReflect().Descriptor(), "")
	if !ok || len(paths) == 0 {
		return err
	}
	protov2.Reset(m)
	if protov2.Unmarshal(fixed, m) != nil {
		return err
	}
	r := m.ProtoReflect()
	r.SetUnknown(protowire.AppendString(protowire.AppendTag(r.GetUnknown(), badUTF8Field, protowire.BytesType), strings.Join(paths, "\n")))
	return nil
}

// validUTF8 copies a wire-format message of type md with every string
// field made valid UTF-8, and returns the paths of the fields it changed
// (API names, e.g. connection.client_id, scopes[1]). ok is false when the
// bytes are not a well-formed message.
func validUTF8(b []byte, md protoreflect.MessageDescriptor, prefix string) (out []byte, paths []string, ok bool) {
	seen := map[protowire.Number]int{}
	for len(b) > 0 {
		num, typ, n := protowire.ConsumeTag(b)
		if n < 0 {
			return nil, nil, false
		}
		out, b = append(out, b[:n]...), b[n:]
		fd := md.Fields().ByNumber(num)
		if typ != protowire.BytesType || fd == nil {
			m := protowire.ConsumeFieldValue(num, typ, b)
			if m < 0 {
				return nil, nil, false
			}
			out, b = append(out, b[:m]...), b[m:]
			continue
		}
		v, m := protowire.ConsumeBytes(b)
		if m < 0 {
			return nil, nil, false
		}
		b = b[m:]
		path := prefix + string(fd.Name())
		if fd.IsList() {
			path += "[" + strconv.Itoa(seen[num]) + "]"
			seen[num]++
		}
		switch {
		case fd.Kind() == protoreflect.StringKind && !utf8.Valid(v):
			v = []byte(strings.ToValidUTF8(string(v), "\uFFFD"))
			paths = append(paths, path)
		case fd.Kind() == protoreflect.MessageKind:
			var sub []string
			if v, sub, ok = validUTF8(v, fd.Message(), path+"."); !ok {
				return nil, nil, false
			}
			paths = append(paths, sub...)
		}
		out = protowire.AppendBytes(out, v)
	}
	return out, paths, true
}

// badUTF8Paths returns the paths [utf8Codec] left in req, if any.
func badUTF8Paths(req any) []string {
	m, ok := req.(protov2.Message)
	if !ok {
		return nil
	}
	var paths []string
	b := m.ProtoReflect().GetUnknown()
	for len(b) > 0 {
		num, typ, n := protowire.ConsumeTag(b)
		if n < 0 {
			return paths
		}
		b = b[n:]
		size := protowire.ConsumeFieldValue(num, typ, b)
		if size < 0 {
			return paths
		}
		if num == badUTF8Field && typ == protowire.BytesType {
			v, _ := protowire.ConsumeString(b)
			paths = append(paths, strings.Split(v, "\n")...)
		}
		b = b[size:]
	}
	return paths
}
