package server

import (
	"bufio"
	"context"
	"crypto/sha256"
	"encoding/hex"
	"io"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"time"
	"unsafe"

	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"
	"google.golang.org/protobuf/types/known/timestamppb"

	pb "tokenbroker/gen/tokenbroker/v1"
)

// Auditor writes one JSON line per TokenBroker or admin service call: who (caller
// identity), what (method), which connection, the outcome, and for token
// hand-outs a fingerprint (a short SHA-256 prefix), never the token.
// Token hand-outs are buffered and flushed every second and on Close, so
// that auditing does not put a write on the token path. Every other call
// (the admin calls, rare and the ones an audit is for) is written out before
// it answers, with whatever was buffered before it: a crash loses at most a
// second of token hand-outs, never an admin call its caller saw succeed.
type Auditor struct {
	mu   sync.Mutex    // guards w
	w    *bufio.Writer // buffered audit sink
	stop chan struct{}
	done chan struct{}
	once sync.Once
	who  func(context.Context) string
	last atomic.Pointer[fingerprinted] // the token last fingerprinted
	// lastPush is the token last sent on a watch stream, with the end of
	// its audit line; pushes buffers those lines (watch.go).
	lastPush  atomic.Pointer[fingerprinted]
	pushes    [pushShards]pushShard
	nextShard atomic.Uint32
}

// NewAuditor writes audit lines to w.
func NewAuditor(w io.Writer) *Auditor {
	a := &Auditor{w: bufio.NewWriterSize(w, 64<<10), stop: make(chan struct{}), done: make(chan struct{})}
	go a.flusher()
	return a
}

// write appends one line to the buffer and, with flush, writes the buffer out.
func (a *Auditor) write(line []byte, flush bool) {
	a.mu.Lock()
	defer a.mu.Unlock()
	if flush {
		a.drainPushesLocked() // what was sent before this call is written before it
	}
	a.w.Write(line)
	if flush {
		a.w.Flush()
	}
}

// Flush writes buffered lines out.
func (a *Auditor) Flush() error {
	a.mu.Lock()
	defer a.mu.Unlock()
	a.drainPushesLocked()
	return a.w.Flush()
}

func (a *Auditor) flusher() {
	defer close(a.done)
	t := time.NewTicker(time.Second)
	defer t.Stop()
	for {
		select {
		case <-t.C:
			a.Flush()
		case <-a.stop:
			a.Flush()
			return
		}
	}
}

// Close flushes and stops the flusher.
func (a *Auditor) Close() error {
	a.once.Do(func() { close(a.stop); <-a.done })
	return nil
}

// Fingerprint is the audit fingerprint of a token: "sha256:" and the first
// 12 hex digits of its SHA-256.
func Fingerprint(token string) string {
	return string(appendFingerprint(nil, token))
}

// appendFingerprint appends the fingerprint of token, hashing it only if it
// is not the token last fingerprinted: one rotation pushed to thousands of
// watch streams, and a cached token handed out again and again, are hashed
// once.
func (a *Auditor) appendFingerprint(b []byte, token string) []byte {
	if p := a.last.Load(); p != nil && p.token == token {
		return append(b, p.fingerprint...)
	}
	start := len(b)
	b = appendFingerprint(b, token)
	a.last.Store(&fingerprinted{token: token, fingerprint: string(b[start:])})
	return b
}

// fingerprinted is a token with its fingerprint.
type fingerprinted struct{ token, fingerprint string }

func appendFingerprint(b []byte, token string) []byte {
	// Hashed in place: a token can be a kilobyte, copied on every call.
	sum := sha256.Sum256(unsafe.Slice(unsafe.StringData(token), len(token)))
	b = append(b, "sha256:"...)
	return hex.AppendEncode(b, sum[:6])
}

func auditTarget(req any) string {
	switch r := req.(type) {
	case *pb.CreateConnectionRequest:
		return r.GetParent() + "/connections/" + r.GetConnectionId()
	case *pb.GetConnectionRequest:
		return r.GetName()
	case *pb.ListConnectionsRequest:
		return r.GetParent()
	case *pb.UpdateConnectionRequest:
		return r.GetConnection().GetName()
	case *pb.DeleteConnectionRequest:
		return r.GetName()
	case *pb.TestConnectionRequest:
		return r.GetName()
	case *pb.GetAccessTokenRequest:
		return r.GetName()
	case *pb.WatchAccessTokenRequest:
		return r.GetName()
	case *pb.WatchConnectionsRequest:
		return r.GetParent()
	}
	name, _, _ := authCodeResource(req)
	return name
}

func (a *Auditor) unary(ctx context.Context, req any, info *grpc.UnaryServerInfo, handler grpc.UnaryHandler) (any, error) {
	if !audited(info.FullMethod) {
		return handler(ctx, req)
	}
	resp, err := handler(ctx, req)
	var handOut *pb.GetAccessTokenResponse
	if r, ok := resp.(*pb.GetAccessTokenResponse); ok && err == nil {
		handOut = r
	}
	var fields []string
	if r, ok := req.(*pb.UpdateConnectionRequest); ok {
		fields = append([]string{}, r.GetUpdateMask().GetPaths()...) // [] when none, as before
	}
	a.record(a.who(ctx), info.FullMethod, auditTarget(req), status.Code(err), handOut.GetAccessToken(), handOut.GetExpireTime(), fields,
		noCount, info.FullMethod != pb.TokenBroker_GetAccessToken_FullMethodName)
	return resp, err
}

// audited reports whether calls of method are audited: TokenBroker's and
// the admin service's (Backup, Rekey, GetKeyStatus), not health checks or
// reflection.
func audited(method string) bool {
	return strings.HasPrefix(method, tokenBrokerMethods) || strings.HasPrefix(method, adminMethods)
}

// noCount is the records argument of [Auditor.record] for a call that
// reports no record count.
const noCount = -1

// record writes one audit line for caller; token, when set, is a hand-out
// recorded by its fingerprint; records, unless noCount, how many records
// a backup sent. With flush, the buffer is written out before it returns.
func (a *Auditor) record(caller, method, target string, code codes.Code, token string, expire *timestamppb.Timestamp, fields []string, records int64, flush bool) {
	// The line is built by hand rather than through slog: it is written on
	// every token hand-out, and this costs a fraction of a JSON handler.
	bp := linePool.Get().(*[]byte)
	b := (*bp)[:0]
	b = append(b, `{"time":"`...)
	b = time.Now().UTC().AppendFormat(b, time.RFC3339Nano)
	b = append(b, `","msg":"audit","caller":`...)
	b = appendJSONString(b, caller)
	b = append(b, `,"method":`...)
	b = appendJSONString(b, method)
	b = append(b, `,"connection":`...)
	b = appendJSONString(b, target)
	b = append(b, `,"outcome":`...)
	b = appendJSONString(b, code.String())
	if token != "" {
		b = append(b, `,"token_fingerprint":"`...)
		b = a.appendFingerprint(b, token)
		b = append(b, `","token_expire_time":"`...)
		b = expire.AsTime().UTC().AppendFormat(b, time.RFC3339)
		b = append(b, '"')
	}
	if records != noCount {
		b = append(b, `,"records":`...)
		b = strconv.AppendInt(b, records, 10)
	}
	if fields != nil {
		b = append(b, `,"fields":[`...)
		for i, p := range fields {
			if i > 0 {
				b = append(b, ',')
			}
			b = appendJSONString(b, p)
		}
		b = append(b, ']')
	}
	b = append(b, "}\n"...)
	a.write(b, flush)
	*bp = b
	linePool.Put(bp)
}

var linePool = sync.Pool{New: func() any { b := make([]byte, 0, 512); return &b }}

// appendJSONString appends s as a JSON string.
func appendJSONString(b []byte, s string) []byte {
	const hex = "0123456789abcdef"
	b = append(b, '"')
	for i := 0; i < len(s); i++ {
		c := s[i]
		switch {
		case c == '"' || c == '\\':
			b = append(b, '\\', c)
		case c < 0x20:
			b = append(b, '\\', 'u', '0', '0', hex[c>>4], hex[c&0xf])
		default:
			b = append(b, c)
		}
	}
	return append(b, '"')
}
