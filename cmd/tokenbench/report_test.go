package main

import (
	"context"
	"crypto/tls"
	"errors"
	"io"
	"strings"
	"testing"
	"time"

	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/credentials"
	"google.golang.org/grpc/status"
	"google.golang.org/protobuf/proto"

	pb "tokenbroker/gen/tokenbroker/v1"

	"tokenbroker/server/servertest"
)

// verdicts evaluates targets and returns each one's verdict by name.
func verdicts(t *testing.T, targets []Target) map[string]bool {
	t.Helper()
	out := map[string]bool{}
	for _, e := range evaluate(targets) {
		out[e.Name] = e.Met
	}
	return out
}

func TestEvaluateBothSidesOfEachEdge(t *testing.T) {
	for _, c := range []struct {
		name string
		t    Target
		met  bool
	}{
		{"at least, at the factor", Target{Measured: 970, Op: "at least", Baseline: 1000, Factor: 0.97}, true},
		{"at least, just under", Target{Measured: 969.9, Op: "at least", Baseline: 1000, Factor: 0.97}, false},
		{"at most, at the factor", Target{Measured: 105, Op: "at most", Baseline: 100, Factor: 1.05}, true},
		{"at most, just over", Target{Measured: 105.01, Op: "at most", Baseline: 100, Factor: 1.05}, false},
		{"at most a limit, at it", Target{Measured: 2, Op: "at most", Limit: 2}, true},
		{"at most a limit, over", Target{Measured: 2.001, Op: "at most", Limit: 2}, false},
		{"exactly, equal", Target{Measured: 6, Op: "exactly", Limit: 6}, true},
		{"exactly, one short", Target{Measured: 5, Op: "exactly", Limit: 6}, false},
		{"exactly, one over", Target{Measured: 7, Op: "exactly", Limit: 6}, false},
		{"relative without a baseline", Target{Measured: 1, Op: "at least", Baseline: 0, Factor: 0.97}, false},
		{"unknown comparison", Target{Measured: 1, Op: "below", Limit: 2}, false},
	} {
		got := evaluate([]Target{c.t})[0]
		if got.Met != c.met {
			t.Errorf("%s: met %v, want %v (%+v)", c.name, got.Met, c.met, got)
		}
	}
	got := evaluate([]Target{{Measured: 970, Op: "at least", Baseline: 1000, Factor: 0.97}, {Measured: 1, Op: "at most", Limit: 4}})
	if got[0].Limit != 1000*0.97 || got[0].Ratio != 0.97 || got[1].Ratio != 0.25 {
		t.Errorf("limits and ratios: %+v", got)
	}
	if missed(got) != 0 || missed(evaluate([]Target{{Measured: 5, Op: "at most", Limit: 4}})) != 1 {
		t.Error("missed does not count the targets not met")
	}
}

// The cached targets: throughput at least 0.97x and p99 at most 1.05x the
// bare echo's, at every level and over both transports. The same-stack echo
// would pass what the bare echo fails; it and the no-op are notes only.
func TestCachedTargetsAgainstTheBareEcho(t *testing.T) {
	point := func(callers int, tput, p99 float64) CachedPoint {
		return CachedPoint{Callers: callers, Bare: Load{PerSecond: 1000, P99US: 100}, Echo: Load{PerSecond: 900, P99US: 120},
			Noop: Load{PerSecond: 2000, P99US: 50}, Token: Load{PerSecond: 1000 * tput, P99US: 100 * p99}}
	}
	c := &CachedResult{Plaintext: []CachedPoint{point(1, 0.97, 1.05), point(16, 0.969, 1.051)}, MutualTLS: []CachedPoint{point(1, 1, 1)}}
	want := map[string]bool{
		"throughput vs bare echo, concurrency 1, plaintext": true, "p99 vs bare echo, concurrency 1, plaintext": true,
		"throughput vs bare echo, concurrency 16, plaintext": false, "p99 vs bare echo, concurrency 16, plaintext": false,
		"throughput vs bare echo, concurrency 1, mutual TLS": true, "p99 vs bare echo, concurrency 1, mutual TLS": true,
	}
	got := verdicts(t, c.targets())
	for name, met := range want {
		if m, ok := got[name]; !ok || m != met {
			t.Errorf("%s: met %v (present %v), want %v", name, m, ok, met)
		}
	}
	if len(got) != len(want) {
		t.Errorf("targets %v, want %v", got, want)
	}
	ts := evaluate(c.targets())
	if ts[0].Baseline != 1000 || ts[1].Baseline != 100 {
		t.Errorf("baselines %v and %v, want the bare echo's 1000 calls/s and 100 µs", ts[0].Baseline, ts[1].Baseline)
	}
	for i, note := range map[int]string{
		0: "cached / same-stack echo 1.078; same-stack echo / bare echo 0.900; cached / no-op 0.485",
		1: "cached / same-stack echo 0.875; same-stack echo / bare echo 1.200; cached / no-op 2.100",
	} {
		if ts[i].Note != note {
			t.Errorf("%s: note %q, want %q", ts[i].Name, ts[i].Note, note)
		}
	}
}

// The bare echo answers what the same-stack echo answers, with nothing else
// registered on its server, and over mutual TLS it verifies client
// certificates as the broker's server does: one from another CA is refused.
func TestBareEchoIsTheEchoAlone(t *testing.T) {
	s := newStack(stackOptions{dir: t.TempDir(), now: time.Now, conns: 1, mtls: true, bareEcho: true})
	defer s.close()
	ctx := context.Background()
	req := &pb.GetAccessTokenRequest{Name: "tenants/t1/connections/erp"}
	bare, stacked := new(pb.GetAccessTokenResponse), new(pb.GetAccessTokenResponse)
	if err := s.bare[0].Invoke(ctx, servertest.EchoMethod, req, bare); err != nil {
		t.Fatal(err)
	}
	if err := s.conns[0].Invoke(ctx, servertest.EchoMethod, req, stacked); err != nil {
		t.Fatal(err)
	}
	if !proto.Equal(bare, stacked) || bare.GetAccessToken() == "" {
		t.Errorf("bare echo %v, same-stack echo %v", bare, stacked)
	}
	for _, err := range []error{servertest.CallNoop(ctx, s.bare[0]), errOf(pb.NewTokenBrokerClient(s.bare[0]).GetAccessToken(ctx, req))} {
		if status.Code(err) != codes.Unimplemented {
			t.Errorf("the bare server serves more than the echo: %v", err)
		}
	}
	target := strings.TrimPrefix(s.bare[0].Target(), "passthrough:///")
	other := must(must(servertest.MakeCA("another CA")).Make(servertest.Leaf{URI: benchIdentity}))
	// Sent even though the server asks for its own CA's, which Go's client
	// would otherwise answer with no certificate.
	send := func(*tls.CertificateRequestInfo) (*tls.Certificate, error) { return &other, nil }
	stranger := must(grpc.NewClient(target, grpc.WithTransportCredentials(credentials.NewTLS(
		&tls.Config{InsecureSkipVerify: true, GetClientCertificate: send}))))
	defer stranger.Close()
	if err := servertest.CallEcho(ctx, stranger, req); status.Code(err) != codes.Unavailable {
		t.Errorf("the bare echo over mutual TLS answered a certificate from another CA: %v", err)
	}
}

// The parked herd over its baseline may take the upstream latency, one
// commit and 10 ms; every herd of every size must make one upstream call.
func TestHerdTargets(t *testing.T) {
	herd := func(parked float64, calls ...int) []*HerdResult {
		small := &HerdResult{Callers: 10, UpstreamCalls: []int{1, 1}}
		return []*HerdResult{small, {Callers: 100, LatencyMS: 50, CommitMS: 1, ParkedMS: parked, ParkedNoopMS: 20, UpstreamCalls: calls}}
	}
	for _, c := range []struct {
		parked       float64
		calls        []int
		time, calls1 bool
	}{
		{20 + 61, []int{1, 1}, true, true},
		{20 + 61.5, []int{1, 1}, false, true},
		{20, []int{1, 2}, true, false},
		{20, []int{0, 1}, true, false},
	} {
		got := evaluate(herdTargets(herd(c.parked, c.calls...)))
		if got[0].Met != c.calls1 || got[1].Met != c.time {
			t.Errorf("parked %v ms, calls %v: %+v", c.parked, c.calls, got)
		}
	}
}

func TestExpiryAndScaleTargets(t *testing.T) {
	e := &ExpiryResult{Conns: 10, Upstream: 10}
	if v := evaluate(e.targets()); missed(v) != 0 {
		t.Errorf("expiry at its target: %+v", v)
	}
	for _, n := range []int{9, 11} {
		if e.Upstream = n; missed(evaluate(e.targets())) != 1 {
			t.Errorf("%d upstream requests for 10 connections met its target", n)
		}
	}
	s := &ScaleResult{Conns: 100000, WarmMS: 500, ColdMS: 1000, RSSMB: 300, ServedMB: 300, CommitP99MS: 2}
	if v := evaluate(s.targets()); missed(v) != 0 || len(v) != 5 {
		t.Errorf("scale at its limits: %+v", v)
	}
	s = &ScaleResult{Conns: 100000, WarmMS: 501, ColdMS: 1001, RSSMB: 301, ServedMB: 301, CommitP99MS: 2.01}
	if v := evaluate(s.targets()); missed(v) != 5 {
		t.Errorf("scale past its limits: %+v", v)
	}
	if v := (&ScaleResult{Conns: 1000, WarmMS: 1e6}).targets(); len(v) != 0 {
		t.Errorf("targets below 100k connections: %+v", v)
	}
}

// Every section's fields exist in the template: rendering a full result
// fails on a name the template uses that the results lack.
func TestRenderAFullResult(t *testing.T) {
	one := Load{PerSecond: 1, P99US: 1}
	p := CachedPoint{Callers: 1, Bare: one, Noop: one, Echo: one, Token: one}
	r := &Results{Cached: &CachedResult{Plaintext: []CachedPoint{p}, MutualTLS: []CachedPoint{p}},
		Herd: []*HerdResult{{Callers: 1}}, Expiry: &ExpiryResult{},
		Scale: []*ScaleResult{{Conns: 100000}}, Etcd: &EtcdResult{}}
	r.Targets = evaluate(append(r.Cached.targets(), r.Scale[0].targets()...))
	if err := render(io.Discard, r); err != nil {
		t.Fatal(err)
	}
}

// TestMedianTakesEachFigureOnItsOwn: one run's outlier in one figure does
// not pick the others.
func TestMedianTakesEachFigureOnItsOwn(t *testing.T) {
	runs := []Load{
		{Calls: 10, PerSecond: 300, P50US: 1, P99US: 90, CPUUS: 7, Errors: 1},
		{Calls: 20, PerSecond: 100, P50US: 3, P99US: 10, CPUUS: 5},
		{Calls: 30, PerSecond: 200, P50US: 2, P99US: 50, CPUUS: 9},
	}
	if got, want := median(runs), (Load{Calls: 60, Errors: 1, PerSecond: 200, P50US: 2, P99US: 50, CPUUS: 7}); got != want {
		t.Errorf("median %+v, want %+v", got, want)
	}
}

// TestRunLoadCountsFailures: a failed call is counted, so that benchCached
// can refuse a mode whose calls fail (they are fast).
func TestRunLoadCountsFailures(t *testing.T) {
	var n int
	r := runLoad(1, 50e6, func(context.Context, int) error {
		if n++; n%2 == 0 {
			return errors.New("refused")
		}
		return nil
	})
	if r.Calls != n || r.Errors != n/2 || r.Calls < 2 {
		t.Errorf("%d calls made, %d failed; result %+v", n, n/2, r)
	}
}
