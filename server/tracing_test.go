package server_test

import (
	"bytes"
	"context"
	"io"
	"log/slog"
	"net"
	"net/http/httptest"
	"path/filepath"
	"strings"
	"testing"

	"go.opentelemetry.io/contrib/instrumentation/google.golang.org/grpc/otelgrpc"
	"go.opentelemetry.io/otel/attribute"
	"go.opentelemetry.io/otel/propagation"
	sdktrace "go.opentelemetry.io/otel/sdk/trace"
	"go.opentelemetry.io/otel/sdk/trace/tracetest"
	"go.opentelemetry.io/otel/trace"
	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials/insecure"

	pb "tokenbroker/gen/tokenbroker/v1"

	"tokenbroker/broker"
	"tokenbroker/broker/acumaticatest"
	"tokenbroker/server"
	"tokenbroker/storage"
	"tokenbroker/storage/bolt"
)

// tracedStack is a broker and a server on loopback wired for tracing as
// the binary wires it: the otelgrpc stats handler on the server, the
// broker's TracerProvider, W3C trace context.
type tracedStack struct {
	idp    *acumaticatest.Server
	idpURL string
	b      *broker.Broker
	cc     *grpc.ClientConn
	client pb.TokenBrokerClient
}

// newTracedStack serves with serverTP's stats handler (none when nil) and
// a broker on brokerTP; the client propagates clientTP's spans (none when
// nil).
func newTracedStack(tb testing.TB, serverTP, brokerTP, clientTP trace.TracerProvider) *tracedStack {
	tb.Helper()
	s := &tracedStack{idp: acumaticatest.New(acumaticatest.Options{})}
	s.idp.AddClient(clientID, clientSecret)
	s.idp.AddUser(username, password)
	hs := httptest.NewServer(s.idp.Handler())
	tb.Cleanup(hs.Close)
	s.idpURL = hs.URL
	keys, _ := storage.NewKeyring(bytes.Repeat([]byte{7}, 32))
	st, err := bolt.Open(filepath.Join(tb.TempDir(), "tokenbroker.db"), bolt.Options{Keyring: keys})
	if err != nil {
		tb.Fatal(err)
	}
	b, err := broker.New(broker.Options{Store: st, TickInterval: -1, TracerProvider: brokerTP, AllowUpstreamCIDRs: loopback})
	if err != nil {
		tb.Fatal(err)
	}
	s.b = b
	prop := otelgrpc.WithPropagators(propagation.TraceContext{})
	var so []grpc.ServerOption
	if serverTP != nil {
		so = append(so, grpc.StatsHandler(otelgrpc.NewServerHandler(otelgrpc.WithTracerProvider(serverTP), prop)))
	}
	srv := server.New(server.Options{Broker: b, Logger: slog.New(slog.NewJSONHandler(io.Discard, nil)), ServerOptions: so, AllowUpstreamCIDRs: loopback})
	lis, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		tb.Fatal(err)
	}
	go srv.Serve(lis)
	dial := []grpc.DialOption{grpc.WithTransportCredentials(insecure.NewCredentials())}
	if clientTP != nil {
		dial = append(dial, grpc.WithStatsHandler(otelgrpc.NewClientHandler(otelgrpc.WithTracerProvider(clientTP), prop)))
	}
	cc, err := grpc.NewClient(lis.Addr().String(), dial...)
	if err != nil {
		tb.Fatal(err)
	}
	s.cc, s.client = cc, pb.NewTokenBrokerClient(cc)
	tb.Cleanup(func() {
		cc.Close()
		srv.Stop()
		b.Close()
		st.Close()
	})
	return s
}

func (s *tracedStack) create(tb testing.TB, ctx context.Context) {
	tb.Helper()
	if _, err := s.client.CreateConnection(ctx, &pb.CreateConnectionRequest{Parent: "tenants/acme", ConnectionId: "erp", Connection: &pb.Connection{
		InstanceUrl: s.idpURL, ClientId: clientID, ClientSecret: clientSecret, Username: username, Password: password,
	}}); err != nil {
		tb.Fatal(err)
	}
}

func attrOf(s tracetest.SpanStub, key string) attribute.Value {
	for _, kv := range s.Attributes {
		if string(kv.Key) == key {
			return kv.Value
		}
	}
	return attribute.Value{}
}

// TestTraceOfARefreshShowsTheUpstreamRequestAsChild: a GetAccessToken
// that triggers a refresh, called inside a client's span, is one trace:
// the client's span, the server's RPC span (trace context propagated over
// gRPC), and the upstream token request as the RPC span's child, though
// the refresh ran on the broker's own context. Every upstream request of
// a connection's life has its span with connection, outcome and status;
// no span holds a secret or a token.
func TestTraceOfARefreshShowsTheUpstreamRequestAsChild(t *testing.T) {
	exp := tracetest.NewInMemoryExporter()
	tp := sdktrace.NewTracerProvider(sdktrace.WithSyncer(exp))
	s := newTracedStack(t, tp, tp, tp)
	ctx := context.Background()
	const name = "tenants/acme/connections/erp"
	s.create(t, ctx)
	t1, err := s.client.GetAccessToken(ctx, &pb.GetAccessTokenRequest{Name: name})
	if err != nil {
		t.Fatal(err)
	}
	exp.Reset()

	callerCtx, caller := tp.Tracer("test").Start(ctx, "caller")
	if _, err := s.client.GetAccessToken(callerCtx, &pb.GetAccessTokenRequest{Name: name, RejectedAccessToken: t1.GetAccessToken()}); err != nil {
		t.Fatal(err)
	}
	caller.End()
	spans := exp.GetSpans()
	var rpc, upstream []tracetest.SpanStub
	for _, sp := range spans {
		switch {
		case sp.Name == "tokenbroker.v1.TokenBroker/GetAccessToken" && sp.SpanKind == trace.SpanKindServer:
			rpc = append(rpc, sp)
		case sp.Name == "upstream token":
			upstream = append(upstream, sp)
		}
	}
	if len(rpc) != 1 || len(upstream) != 1 {
		t.Fatalf("spans: %d RPC, %d upstream token (of %d), want 1 each", len(rpc), len(upstream), len(spans))
	}
	if rpc[0].SpanContext.TraceID() != caller.SpanContext().TraceID() {
		t.Error("the RPC span is not in the caller's trace: trace context was not propagated")
	}
	if upstream[0].Parent.SpanID() != rpc[0].SpanContext.SpanID() || upstream[0].SpanContext.TraceID() != rpc[0].SpanContext.TraceID() {
		t.Errorf("upstream token span's parent = %v, want the RPC span %v", upstream[0].Parent.SpanID(), rpc[0].SpanContext.SpanID())
	}
	up := upstream[0]
	if attrOf(up, "tokenbroker.connection").AsString() != name || attrOf(up, "tokenbroker.grant").AsString() != "refresh_token" ||
		attrOf(up, "tokenbroker.outcome").AsString() != "ok" || attrOf(up, "http.response.status_code").AsInt64() != 200 ||
		up.SpanKind != trace.SpanKindClient {
		t.Errorf("upstream token span attributes %v kind %v", up.Attributes, up.SpanKind)
	}

	// The rest of a connection's life: probes, revocation and logout.
	if _, err := s.client.TestConnection(ctx, &pb.TestConnectionRequest{Name: name, Entities: []string{"SalesOrder"}}); err != nil {
		t.Fatal(err)
	}
	if _, err := s.client.DeleteConnection(ctx, &pb.DeleteConnectionRequest{Name: name}); err != nil {
		t.Fatal(err)
	}
	kinds := map[string]bool{}
	for _, sp := range exp.GetSpans() {
		if k := attrOf(sp, "tokenbroker.upstream.request").AsString(); k != "" {
			kinds[k] = true
			if attrOf(sp, "tokenbroker.connection").AsString() != name || attrOf(sp, "tokenbroker.outcome").AsString() == "" {
				t.Errorf("span %s lacks connection or outcome: %v", sp.Name, sp.Attributes)
			}
		}
	}
	for _, k := range []string{"token", "probe", "revocation", "logout"} {
		if !kinds[k] {
			t.Errorf("no upstream %s span (saw %v)", k, kinds)
		}
	}
	scanSpansForSecrets(t, append(spans, exp.GetSpans()...), append([]string{clientSecret, password}, s.idp.Issued()...))
}

// TestTraceOfCreateShowsDiscovery: the first request to an instance reads
// its discovery document, traced with the connection it was for.
func TestTraceOfCreateShowsDiscovery(t *testing.T) {
	exp := tracetest.NewInMemoryExporter()
	tp := sdktrace.NewTracerProvider(sdktrace.WithSyncer(exp))
	s := newTracedStack(t, tp, tp, nil)
	s.create(t, context.Background())
	var found bool
	for _, sp := range exp.GetSpans() {
		if sp.Name == "upstream discovery" {
			found = attrOf(sp, "tokenbroker.connection").AsString() == "tenants/acme/connections/erp" && attrOf(sp, "http.response.status_code").AsInt64() == 200
		}
	}
	if !found {
		t.Error("no upstream discovery span with the connection and status 200")
	}
	scanSpansForSecrets(t, exp.GetSpans(), append([]string{clientSecret, password}, s.idp.Issued()...))
}

// scanSpansForSecrets fails if any secret appears in a span's name,
// attributes, events, links or status.
func scanSpansForSecrets(t *testing.T, spans []tracetest.SpanStub, secrets []string) {
	t.Helper()
	if len(spans) == 0 {
		t.Fatal("no spans to scan")
	}
	var texts []string
	kvs := func(list []attribute.KeyValue) {
		for _, kv := range list {
			texts = append(texts, string(kv.Key)+"="+kv.Value.Emit())
		}
	}
	for _, sp := range spans {
		texts = append(texts, sp.Name, sp.Status.Description)
		kvs(sp.Attributes)
		for _, ev := range sp.Events {
			texts = append(texts, ev.Name)
			kvs(ev.Attributes)
		}
		for _, l := range sp.Links {
			kvs(l.Attributes)
		}
	}
	all := strings.Join(texts, "\n")
	for _, sec := range secrets {
		if strings.Contains(all, sec) {
			t.Errorf("secret %.6s... found in a span", sec)
		}
	}
}

// BenchmarkCachedTracing runs cached GetAccessToken calls over loopback
// with tracing off (no stats handler, a no-op broker provider: the
// binary without OTEL_* variables), with the otelgrpc handler and a
// sampler that never samples, and with every call sampled (spans
// discarded). Read them as ratios to "off":
//
//	go test -run '^$' -bench CachedTracing -count 5 ./server/
func BenchmarkCachedTracing(b *testing.B) {
	never := sdktrace.NewTracerProvider(sdktrace.WithSampler(sdktrace.NeverSample()))
	always := sdktrace.NewTracerProvider(sdktrace.WithSampler(sdktrace.AlwaysSample()), sdktrace.WithSpanProcessor(discard{}))
	for _, mode := range []struct {
		name string
		tp   trace.TracerProvider
	}{{"off", nil}, {"unsampled", never}, {"sampled", always}} {
		b.Run(mode.name, func(b *testing.B) {
			s := newTracedStack(b, mode.tp, mode.tp, nil)
			ctx := context.Background()
			s.create(b, ctx)
			req := &pb.GetAccessTokenRequest{Name: "tenants/acme/connections/erp"}
			b.ReportAllocs()
			b.ResetTimer()
			b.RunParallel(func(pb *testing.PB) {
				for pb.Next() {
					if _, err := s.client.GetAccessToken(ctx, req); err != nil {
						b.Error(err)
						return
					}
				}
			})
		})
	}
}

// discard is a span processor that drops every span.
type discard struct{}

func (discard) OnStart(context.Context, sdktrace.ReadWriteSpan) {}
func (discard) OnEnd(sdktrace.ReadOnlySpan)                     {}
func (discard) Shutdown(context.Context) error                  { return nil }
func (discard) ForceFlush(context.Context) error                { return nil }
