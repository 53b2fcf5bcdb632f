package server

import (
	"bufio"
	"context"
	"crypto/sha256"
	"encoding/hex"
	"io"
	"log/slog"
	"strings"
	"sync"
	"time"

	"google.golang.org/grpc"
	"google.golang.org/grpc/status"

	pb "tokenbroker/gen/tokenbroker/v1"
)

// Auditor writes one JSON line per TokenBroker call: who (caller
// identity), what (method), which connection, the outcome, and for token
// hand-outs a fingerprint (a short SHA-256 prefix), never the token. Lines
// are buffered and flushed every second and on Close, so that auditing
// does not put a write on the token path.
type Auditor struct {
	mu   sync.Mutex    // guards w
	w    *bufio.Writer // buffered audit sink
	out  io.Writer
	log  *slog.Logger
	stop chan struct{}
	done chan struct{}
	once sync.Once
	who  func(context.Context) string
}

// NewAuditor writes audit lines to w.
func NewAuditor(w io.Writer) *Auditor {
	a := &Auditor{w: bufio.NewWriterSize(w, 64<<10), out: w, stop: make(chan struct{}), done: make(chan struct{})}
	a.log = slog.New(slog.NewJSONHandler(a, nil))
	go a.flusher()
	return a
}

// Write implements io.Writer for the JSON handler: one call per line.
func (a *Auditor) Write(p []byte) (int, error) {
	a.mu.Lock()
	defer a.mu.Unlock()
	return a.w.Write(p)
}

// Flush writes buffered lines out.
func (a *Auditor) Flush() error {
	a.mu.Lock()
	defer a.mu.Unlock()
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
	sum := sha256.Sum256([]byte(token))
	return "sha256:" + hex.EncodeToString(sum[:6])
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
	}
	return ""
}

func (a *Auditor) unary(ctx context.Context, req any, info *grpc.UnaryServerInfo, handler grpc.UnaryHandler) (any, error) {
	if !strings.HasPrefix(info.FullMethod, "/tokenbroker.v1.TokenBroker/") {
		return handler(ctx, req)
	}
	target := auditTarget(req)
	resp, err := handler(ctx, req)
	attrs := []any{
		"caller", a.who(ctx),
		"method", info.FullMethod,
		"connection", target,
		"outcome", status.Code(err).String(),
	}
	if r, ok := resp.(*pb.GetAccessTokenResponse); ok && err == nil {
		attrs = append(attrs, "token_fingerprint", Fingerprint(r.GetAccessToken()), "token_expire_time", r.GetExpireTime().AsTime())
	}
	if r, ok := req.(*pb.UpdateConnectionRequest); ok {
		attrs = append(attrs, "fields", r.GetUpdateMask().GetPaths())
	}
	a.log.InfoContext(ctx, "audit", attrs...)
	return resp, err
}
