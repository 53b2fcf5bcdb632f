package server_test

import (
	"bytes"
	"context"
	"io"
	"net/http"
	"net/http/httptest"
	"sort"
	"strings"
	"testing"
	"time"

	"github.com/prometheus/common/expfmt"
	"github.com/prometheus/common/model"
	"google.golang.org/protobuf/types/known/durationpb"

	pb "tokenbroker/gen/tokenbroker/v1"

	"tokenbroker/broker"
	"tokenbroker/broker/acumaticatest"
	"tokenbroker/internal/testkit"
	"tokenbroker/server"
)

// series scrapes m and returns each series of the metric name as its
// labels (name=value, sorted, comma-joined) with its value.
func series(t *testing.T, m *server.Metrics, name string) map[string]float64 {
	t.Helper()
	hs := httptest.NewServer(m.Handler())
	defer hs.Close()
	resp, err := http.Get(hs.URL)
	if err != nil {
		t.Fatal(err)
	}
	body, _ := io.ReadAll(resp.Body)
	resp.Body.Close()
	parser := expfmt.NewTextParser(model.UTF8Validation)
	families, err := parser.TextToMetricFamilies(bytes.NewReader(body))
	if err != nil {
		t.Fatalf("parse metrics: %v", err)
	}
	out := map[string]float64{}
	for _, s := range families[name].GetMetric() {
		var labels []string
		for _, l := range s.GetLabel() {
			labels = append(labels, l.GetName()+"="+l.GetValue())
		}
		sort.Strings(labels)
		out[strings.Join(labels, ",")] = s.GetGauge().GetValue()
	}
	return out
}

// TestUnhealthyConnectionMetric drives a connection DEGRADED and then
// NEEDS_REAUTH against the stand-in: each state shows as one series with
// the reason code, and an ACTIVE connection has none.
func TestUnhealthyConnectionMetric(t *testing.T) {
	clk := testkit.NewClock()
	f := newFixture(t, func(o *broker.Options) { o.Now = clk.Now })
	m := server.NewMetrics()
	m.Watch(f.b, clk.Now)
	f.create("acme", "erp")
	f.create("acme", "other")
	const name = "tenants/acme/connections/erp"
	if got := series(t, m, "tokenbroker_connection_unhealthy"); len(got) != 0 {
		t.Fatalf("series while every connection is ACTIVE: %v", got)
	}

	tok, err := f.client.GetAccessToken(context.Background(), &pb.GetAccessTokenRequest{Name: name})
	if err != nil {
		t.Fatal(err)
	}
	f.idp.Inject(acumaticatest.Fault{Status: 503})
	if _, err := f.client.GetAccessToken(context.Background(), &pb.GetAccessTokenRequest{Name: name, RejectedAccessToken: tok.GetAccessToken()}); err == nil {
		t.Fatal("a refresh against a failing upstream succeeded")
	}
	want := map[string]float64{"connection=" + name + ",reason=UPSTREAM_UNAVAILABLE,state=DEGRADED": 1}
	if got := series(t, m, "tokenbroker_connection_unhealthy"); !equalSeries(got, want) {
		t.Errorf("DEGRADED: series = %v, want %v", got, want)
	}

	f.idp.AddClient(clientID, "rotated-away-by-an-admin")
	clk.Advance(time.Minute) // past the backoff
	if _, err := f.client.GetAccessToken(context.Background(), &pb.GetAccessTokenRequest{Name: name, RejectedAccessToken: tok.GetAccessToken()}); err == nil {
		t.Fatal("a refresh with a rejected client succeeded")
	}
	want = map[string]float64{"connection=" + name + ",reason=CLIENT_REJECTED,state=NEEDS_REAUTH": 1}
	if got := series(t, m, "tokenbroker_connection_unhealthy"); !equalSeries(got, want) {
		t.Errorf("NEEDS_REAUTH: series = %v, want %v", got, want)
	}
	if got := series(t, m, "tokenbroker_connections")["state=NEEDS_REAUTH"]; got != 1 {
		t.Errorf("tokenbroker_connections{state=NEEDS_REAUTH} = %v, want 1", got)
	}
}

// TestRefreshTokenLapseMetric: a chain shows only within a week of
// lapsing, idle and absolute apart, in seconds on the broker's clock.
func TestRefreshTokenLapseMetric(t *testing.T) {
	clk := testkit.NewClock()
	f := newFixture(t, func(o *broker.Options) { o.Now = clk.Now })
	m := server.NewMetrics()
	m.Watch(f.b, clk.Now)
	const name = "tenants/acme/connections/erp"
	c := f.connection()
	c.RefreshTokenAbsoluteLifetime = durationpb.New(12 * 24 * time.Hour)
	if _, err := f.client.CreateConnection(context.Background(), &pb.CreateConnectionRequest{Parent: "tenants/acme", ConnectionId: "erp", Connection: c}); err != nil {
		t.Fatal(err)
	}
	f.create("acme", "steady")
	if got := series(t, m, "tokenbroker_refresh_token_lapse_seconds"); len(got) != 0 {
		t.Fatalf("series for fresh chains (idle in 15 days, absolute in 12): %v", got)
	}

	clk.Advance(6 * 24 * time.Hour) // absolute in 6 days, idle in 9
	want := map[string]float64{"connection=" + name + ",kind=absolute": (6 * 24 * time.Hour).Seconds()}
	if got := series(t, m, "tokenbroker_refresh_token_lapse_seconds"); !equalSeries(got, want) {
		t.Errorf("after 6 days: %v, want %v", got, want)
	}

	clk.Advance(3 * 24 * time.Hour) // absolute in 3 days, idle in 6 (both connections)
	want = map[string]float64{
		"connection=" + name + ",kind=absolute":                (3 * 24 * time.Hour).Seconds(),
		"connection=" + name + ",kind=idle":                    (6 * 24 * time.Hour).Seconds(),
		"connection=tenants/acme/connections/steady,kind=idle": (6 * 24 * time.Hour).Seconds(),
	}
	if got := series(t, m, "tokenbroker_refresh_token_lapse_seconds"); !equalSeries(got, want) {
		t.Errorf("after 9 days: %v, want %v", got, want)
	}
}

func equalSeries(a, b map[string]float64) bool {
	if len(a) != len(b) {
		return false
	}
	for k, v := range a {
		if w, ok := b[k]; !ok || w != v {
			return false
		}
	}
	return true
}
