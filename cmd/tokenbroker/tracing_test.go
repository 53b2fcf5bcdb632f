package main

import (
	"context"
	"encoding/hex"
	"io"
	"net/http"
	"net/http/httptest"
	"path/filepath"
	"slices"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	collectorpb "go.opentelemetry.io/proto/otlp/collector/trace/v1"
	"google.golang.org/grpc/metadata"
	"google.golang.org/protobuf/proto"

	pb "tokenbroker/gen/tokenbroker/v1"
)

func TestTracingWanted(t *testing.T) {
	for _, tc := range []struct {
		env     map[string]string
		want    bool
		wantErr bool
	}{
		{nil, false, false},
		{map[string]string{"OTEL_EXPORTER_OTLP_ENDPOINT": "http://collector:4317"}, true, false},
		{map[string]string{"OTEL_EXPORTER_OTLP_TRACES_ENDPOINT": "http://collector:4318/v1/traces"}, true, false},
		{map[string]string{"OTEL_TRACES_EXPORTER": "otlp"}, true, false},
		{map[string]string{"OTEL_TRACES_EXPORTER": "none", "OTEL_EXPORTER_OTLP_ENDPOINT": "http://collector:4317"}, false, false},
		{map[string]string{"OTEL_SDK_DISABLED": "true", "OTEL_TRACES_EXPORTER": "otlp"}, false, false},
		{map[string]string{"OTEL_SDK_DISABLED": "false", "OTEL_TRACES_EXPORTER": "otlp"}, true, false},
		{map[string]string{"OTEL_TRACES_EXPORTER": "zipkin"}, false, true},
	} {
		got, err := tracingWanted(func(k string) string { return tc.env[k] })
		if got != tc.want || (err != nil) != tc.wantErr {
			t.Errorf("%v: %v, %v; want %v, error %v", tc.env, got, err, tc.want, tc.wantErr)
		}
	}
	for _, tc := range []struct {
		env  map[string]string
		want string
	}{
		{nil, "grpc"},
		{map[string]string{"OTEL_EXPORTER_OTLP_PROTOCOL": "http/protobuf"}, "http/protobuf"},
		{map[string]string{"OTEL_EXPORTER_OTLP_PROTOCOL": "http/protobuf", "OTEL_EXPORTER_OTLP_TRACES_PROTOCOL": "grpc"}, "grpc"},
	} {
		if got := protocolOf(func(k string) string { return tc.env[k] }); got != tc.want {
			t.Errorf("%v: protocol %q, want %q", tc.env, got, tc.want)
		}
	}
}

// collector is a stand-in OTLP/HTTP trace collector.
type collector struct {
	mu    sync.Mutex
	raw   [][]byte
	spans map[string][]string // span name -> the trace ids of spans so named
	attrs []string            // resource attributes key=value
}

func (c *collector) ServeHTTP(w http.ResponseWriter, r *http.Request) {
	body, _ := io.ReadAll(r.Body)
	var req collectorpb.ExportTraceServiceRequest
	if r.URL.Path != "/v1/traces" || proto.Unmarshal(body, &req) != nil {
		http.Error(w, "bad export", http.StatusBadRequest)
		return
	}
	c.mu.Lock()
	defer c.mu.Unlock()
	c.raw = append(c.raw, body)
	for _, rs := range req.GetResourceSpans() {
		for _, kv := range rs.GetResource().GetAttributes() {
			c.attrs = append(c.attrs, kv.GetKey()+"="+kv.GetValue().GetStringValue())
		}
		for _, ss := range rs.GetScopeSpans() {
			for _, sp := range ss.GetSpans() {
				c.spans[sp.GetName()] = append(c.spans[sp.GetName()], hex.EncodeToString(sp.GetTraceId()))
			}
		}
	}
	w.Header().Set("Content-Type", "application/x-protobuf")
	w.Write(nil)
}

// TestBinaryExportsTracesOverOTLP: with OTEL_* variables the binary
// exports a span per call and per upstream request, continues a caller's
// W3C traceparent, names itself tokenbroker, flushes at SIGTERM, and no
// exported byte holds a secret or a token.
func TestBinaryExportsTracesOverOTLP(t *testing.T) {
	col := &collector{spans: map[string][]string{}}
	cs := httptest.NewServer(col)
	defer cs.Close()
	s, url := idp(t)
	p := start(t, []string{
		"OTEL_EXPORTER_OTLP_ENDPOINT=" + cs.URL,
		"OTEL_EXPORTER_OTLP_PROTOCOL=http/protobuf",
		"OTEL_RESOURCE_ATTRIBUTES=deployment.environment=test",
	}, "--data-dir", filepath.Join(t.TempDir(), "data"), "--listen", "127.0.0.1:0")
	c := p.client()
	createConnection(t, c, "tenants/acme", url)
	const traceID = "4bf92f3577b34da6a3ce929d0e0e4736"
	ctx := metadata.AppendToOutgoingContext(context.Background(), "traceparent", "00-"+traceID+"-00f067aa0ba902b7-01")
	tok, err := c.GetAccessToken(ctx, &pb.GetAccessTokenRequest{Name: connName})
	if err != nil {
		t.Fatal(err)
	}
	if _, err := c.GetAccessToken(ctx, &pb.GetAccessTokenRequest{Name: connName, RejectedAccessToken: tok.GetAccessToken()}); err != nil {
		t.Fatal(err)
	}
	p.cmd.Process.Signal(syscall.SIGTERM)
	select {
	case <-p.exited:
	case <-time.After(30 * time.Second):
		t.Fatal("did not stop on SIGTERM")
	}
	col.mu.Lock()
	defer col.mu.Unlock()
	for _, name := range []string{"tokenbroker.v1.TokenBroker/CreateConnection", "tokenbroker.v1.TokenBroker/GetAccessToken", "upstream token", "upstream discovery"} {
		if _, ok := col.spans[name]; !ok {
			t.Errorf("no span %q exported (got %d spans)", name, len(col.spans))
		}
	}
	if got := col.spans["upstream token"]; !slices.Contains(got, traceID) {
		t.Errorf("upstream token spans are in traces %v, none in the caller's %s", got, traceID)
	}
	attrs := strings.Join(col.attrs, " ")
	if !strings.Contains(attrs, "service.name=tokenbroker") || !strings.Contains(attrs, "deployment.environment=test") {
		t.Errorf("resource attributes %s", attrs)
	}
	all := string(joinBytes(col.raw))
	for _, sec := range append([]string{clientSecret, password}, s.Issued()...) {
		if strings.Contains(all, sec) {
			t.Errorf("secret %.6s... exported in a span", sec)
		}
	}
}

func joinBytes(parts [][]byte) []byte {
	var out []byte
	for _, p := range parts {
		out = append(out, p...)
	}
	return out
}
