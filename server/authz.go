package server

import (
	"context"
	"crypto/x509"
	"errors"
	"net"
	"strings"
	"sync/atomic"

	"github.com/grpc-ecosystem/go-grpc-middleware/v2/interceptors"
	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials"
	"google.golang.org/grpc/peer"

	pb "tokenbroker/gen/tokenbroker/v1"

	"tokenbroker/broker"
)

// DevIdentity is the caller identity in dev mode (no policy, plaintext
// loopback): every caller is an operator and a consumer.
const DevIdentity = "dev-mode-local-caller"

var (
	errUnauthenticated  = errors.New("server: caller not authenticated")
	errPermissionDenied = errors.New("server: permission denied")
)

// authError is an authentication or authorization failure.
type authError struct {
	kind     error
	identity string
	name     string
}

func (e *authError) Error() string { return e.kind.Error() }
func (e *authError) Unwrap() error { return e.kind }

// Kinds of caller identity. A policy pattern matches identities of its
// own kind only: a subject CN never stands for a URI or DNS identity.
const (
	KindURI = "uri" // a URI SAN, such as a SPIFFE ID
	KindDNS = "dns" // a DNS SAN
	KindCN  = "cn"  // the subject common name of a certificate without URI or DNS SANs
)

// Caller is a caller identity: what a client certificate names, and as
// what.
type Caller struct {
	Kind  string // KindURI, KindDNS or KindCN
	Value string
}

// Key is the identity as policies index it: kind, a colon, the value.
func (c Caller) Key() string { return c.Kind + ":" + c.Value }

// Identity returns the caller identity of a client certificate: its first
// URI SAN (SPIFFE-style), else its first DNS SAN, else its subject CN.
func Identity(cert *x509.Certificate) Caller {
	switch {
	case len(cert.URIs) > 0:
		return Caller{Kind: KindURI, Value: cert.URIs[0].String()}
	case len(cert.DNSNames) > 0:
		return Caller{Kind: KindDNS, Value: cert.DNSNames[0]}
	case cert.Subject.CommonName != "":
		return Caller{Kind: KindCN, Value: cert.Subject.CommonName}
	}
	return Caller{}
}

// peerIdentity is the verified client certificate identity of the call.
// Over [TLSFiles.Credentials] it was found once, at the handshake.
func peerIdentity(ctx context.Context) (Caller, bool) {
	p, ok := peer.FromContext(ctx)
	if !ok {
		return Caller{}, false
	}
	switch ai := p.AuthInfo.(type) {
	case callerInfo:
		return ai.identity, ai.identity.Value != ""
	case credentials.TLSInfo:
		id := tlsIdentity(ai)
		return id, id.Value != ""
	}
	return Caller{}, false
}

// tlsIdentity is the identity of a verified client certificate, or none.
func tlsIdentity(ti credentials.TLSInfo) Caller {
	if len(ti.State.VerifiedChains) == 0 || len(ti.State.VerifiedChains[0]) == 0 {
		return Caller{}
	}
	return Identity(ti.State.VerifiedChains[0][0])
}

// callerInfo is a TLS connection's AuthInfo with the caller identity of
// its verified client certificate, found once per connection rather than
// formatted from the certificate on every call.
type callerInfo struct {
	credentials.TLSInfo
	identity Caller
}

// identityCreds wraps TLS server credentials so that each connection's
// AuthInfo is a [callerInfo].
type identityCreds struct {
	credentials.TransportCredentials
}

func (c identityCreds) ServerHandshake(raw net.Conn) (net.Conn, credentials.AuthInfo, error) {
	conn, ai, err := c.TransportCredentials.ServerHandshake(raw)
	if ti, ok := ai.(credentials.TLSInfo); ok && err == nil {
		return conn, callerInfo{TLSInfo: ti, identity: tlsIdentity(ti)}, nil
	}
	return conn, ai, err
}

func (c identityCreds) Clone() credentials.TransportCredentials {
	return identityCreds{c.TransportCredentials.Clone()}
}

// Authorizer decides who may call what. Without a policy it is in dev
// mode: every caller is an operator and a consumer.
type Authorizer struct {
	policy atomic.Pointer[Policy] // swapped whole on reload
}

// NewAuthorizer returns an authorizer over p; nil p means dev mode.
func NewAuthorizer(p *Policy) *Authorizer {
	a := &Authorizer{}
	a.policy.Store(p)
	return a
}

// SetPolicy replaces the policy (on reload).
func (a *Authorizer) SetPolicy(p *Policy) { a.policy.Store(p) }

// DevMode reports whether there is no policy.
func (a *Authorizer) DevMode() bool { return a.policy.Load() == nil }

// callerIdentity names the caller for logs and audit, whether or not it is
// authorized.
func (a *Authorizer) callerIdentity(ctx context.Context) string {
	if id, ok := peerIdentity(ctx); ok {
		return id.Value
	}
	if a.DevMode() {
		return DevIdentity
	}
	return ""
}

// callerKind is the kind of the caller's identity for logs, "" in dev mode.
func (a *Authorizer) callerKind(ctx context.Context) string {
	id, _ := peerIdentity(ctx)
	return id.Kind
}

// callerKey tells callers apart for rate limits: two identities of
// different kinds are different callers.
func (a *Authorizer) callerKey(ctx context.Context) string {
	if id, ok := peerIdentity(ctx); ok {
		return id.Key()
	}
	return a.callerIdentity(ctx)
}

type listFilterKey struct{}

// listFilter returns the caller's filter for listed names, or nil for all.
func listFilter(ctx context.Context) func(string) bool {
	f, _ := ctx.Value(listFilterKey{}).(func(string) bool)
	return f
}

// unary authenticates the caller and checks the request's resource:
// unknown callers get UNAUTHENTICATED, known callers without the grant
// PERMISSION_DENIED, before anything reads the store (so existence is not
// revealed).
func (a *Authorizer) unary(ctx context.Context, req any, info *grpc.UnaryServerInfo, handler grpc.UnaryHandler) (any, error) {
	p, caller, err := a.authenticate(ctx)
	if err != nil {
		return nil, err
	}
	if p == nil {
		return handler(ctx, req)
	}
	id := caller.Key()
	if strings.HasPrefix(info.FullMethod, adminMethods) && operatorOfAll(p, id) {
		return handler(ctx, req)
	}
	if !strings.HasPrefix(info.FullMethod, tokenBrokerMethods) {
		// A method added beside TokenBroker: no rule can grant it, whatever
		// its request says.
		return nil, toStatus(nil, &authError{kind: errPermissionDenied, identity: caller.Value})
	}
	manage := func(tenant string) bool { return p.CanManage(id, tenant) }
	tenantOf := func(name string) string { t, _, _ := broker.ParseConnectionName(name); return t }
	var allowed bool
	var name string
	switch r := req.(type) {
	case *pb.CreateConnectionRequest:
		t, _ := broker.ParseParent(r.GetParent(), false)
		name, allowed = r.GetParent(), manage(t)
	case *pb.GetConnectionRequest:
		name, allowed = r.GetName(), manage(tenantOf(r.GetName()))
	case *pb.UpdateConnectionRequest:
		name, allowed = r.GetConnection().GetName(), manage(tenantOf(r.GetConnection().GetName()))
	case *pb.DeleteConnectionRequest:
		name, allowed = r.GetName(), manage(tenantOf(r.GetName()))
	case *pb.ListConnectionsRequest:
		t, _ := broker.ParseParent(r.GetParent(), true)
		name = r.GetParent()
		if t == broker.AllTenants {
			allowed = p.IsOperator(id)
			ctx = context.WithValue(ctx, listFilterKey{}, func(n string) bool { return manage(tenantOf(n)) })
		} else {
			allowed = manage(t)
		}
	case *pb.TestConnectionRequest:
		name, allowed = r.GetName(), manage(tenantOf(r.GetName())) || p.CanConsume(id, r.GetName())
	case *pb.GetAccessTokenRequest:
		name, allowed = r.GetName(), p.CanConsume(id, r.GetName())
	default:
		if n, t, ok := authCodeResource(req); ok {
			name, allowed = n, manage(t)
		}
	}
	if !allowed {
		return nil, toStatus(nil, &authError{kind: errPermissionDenied, identity: caller.Value, name: name})
	}
	return handler(ctx, req)
}

// withAuthenticated returns a.unary, except that the methods in open
// (full names) need only a caller the policy knows: no rule names them.
func (a *Authorizer) withAuthenticated(open []string) grpc.UnaryServerInterceptor {
	if len(open) == 0 {
		return a.unary
	}
	set := make(map[string]bool, len(open))
	for _, m := range open {
		set[m] = true
	}
	return func(ctx context.Context, req any, info *grpc.UnaryServerInfo, handler grpc.UnaryHandler) (any, error) {
		if !set[info.FullMethod] {
			return a.unary(ctx, req, info, handler)
		}
		if _, _, err := a.authenticate(ctx); err != nil {
			return nil, err
		}
		return handler(ctx, req)
	}
}

// authenticate returns the policy and the caller's identity, which the
// policy knows; a nil policy in dev mode, where every caller is known.
func (a *Authorizer) authenticate(ctx context.Context) (*Policy, Caller, error) {
	p := a.policy.Load()
	if p == nil {
		return nil, Caller{}, nil
	}
	id, ok := peerIdentity(ctx)
	if !ok || !p.Known(id.Key()) {
		return nil, Caller{}, toStatus(nil, &authError{kind: errUnauthenticated, identity: id.Value})
	}
	return p, id, nil
}

// stream guards streaming services: WatchAccessToken is for consumers,
// server reflection for operators, the admin service for operators of
// every tenant.
func (a *Authorizer) stream(srv any, ss grpc.ServerStream, info *grpc.StreamServerInfo, handler grpc.StreamHandler) error {
	p, id, err := a.authenticate(ss.Context())
	if err != nil {
		return err
	}
	if p == nil {
		return handler(srv, ss)
	}
	if isWatch(info) { // the consumer role, as GetAccessToken
		return handler(srv, &consumerStream{ServerStream: ss, a: a, id: id})
	}
	if !p.IsOperator(id.Key()) || strings.HasPrefix(info.FullMethod, adminMethods) && !operatorOfAll(p, id.Key()) {
		return toStatus(nil, &authError{kind: errPermissionDenied, identity: id.Value})
	}
	return handler(srv, withOperator(ss, operatorScope{a: a, id: id}))
}

// needsAuth selects every call but health checks.
func needsAuth(_ context.Context, c interceptors.CallMeta) bool {
	return c.Service != "grpc.health.v1.Health"
}
