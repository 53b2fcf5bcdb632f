package server

import (
	"net/http"
	"time"

	grpcprom "github.com/grpc-ecosystem/go-grpc-middleware/providers/prometheus"
	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/collectors"
	"github.com/prometheus/client_golang/prometheus/promhttp"

	"tokenbroker/broker"
)

// Metrics holds the service's Prometheus metrics. It implements
// [broker.Observer].
type Metrics struct {
	registry *prometheus.Registry
	grpc     *grpcprom.ServerMetrics
	upstream *prometheus.CounterVec
	latency  *prometheus.HistogramVec
	hits     prometheus.Counter
	misses   prometheus.Counter
	watches  prometheus.Gauge // open WatchAccessToken streams
	census   *censusCollector
}

// NewMetrics builds the registry: gRPC server metrics (go-grpc-middleware's
// prometheus provider), upstream token requests by grant and outcome,
// their latency, cache hits and misses, and (once [Metrics.Watch] is
// called) connections by state, seconds until each client secret expires,
// the connections that are not ACTIVE, and the refresh token chains that
// lapse within a week.
func NewMetrics() *Metrics {
	m := &Metrics{
		registry: prometheus.NewRegistry(),
		grpc: grpcprom.NewServerMetrics(grpcprom.WithServerHandlingTimeHistogram(
			grpcprom.WithHistogramBuckets([]float64{0.0001, 0.0005, 0.001, 0.005, 0.01, 0.05, 0.1, 0.5, 1, 5, 30}))),
		upstream: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "tokenbroker_upstream_token_requests_total",
			Help: "Upstream token requests by grant (password, refresh_token) and outcome (ok or failure class).",
		}, []string{"grant", "outcome"}),
		latency: prometheus.NewHistogramVec(prometheus.HistogramOpts{
			Name:    "tokenbroker_upstream_token_request_seconds",
			Help:    "Latency of upstream token requests.",
			Buckets: []float64{0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30},
		}, []string{"grant"}),
		hits: prometheus.NewCounter(prometheus.CounterOpts{
			Name: "tokenbroker_token_cache_hits_total", Help: "GetAccessToken calls served from memory.",
		}),
		misses: prometheus.NewCounter(prometheus.CounterOpts{
			Name: "tokenbroker_token_cache_misses_total", Help: "GetAccessToken calls that waited for a shared refresh.",
		}),
		watches: prometheus.NewGauge(prometheus.GaugeOpts{
			Name: "tokenbroker_watch_streams", Help: "Open WatchAccessToken streams.",
		}),
		census: &censusCollector{
			states: prometheus.NewDesc("tokenbroker_connections", "Connections by state.", []string{"state"}, nil),
			expiry: prometheus.NewDesc("tokenbroker_client_secret_expiry_seconds", "Seconds until the connection's client secret expires (negative: expired).", []string{"connection"}, nil),
			unhealthy: prometheus.NewDesc("tokenbroker_connection_unhealthy",
				"1 for each connection that is not ACTIVE (state DEGRADED, NEEDS_REAUTH or REFRESH_TOKEN_MISSING; reason: the ErrorInfo reason code of its last error). ACTIVE connections have no series.",
				[]string{"connection", "state", "reason"}, nil),
			lapse: prometheus.NewDesc("tokenbroker_refresh_token_lapse_seconds",
				"Seconds until the connection's refresh token chain lapses (kind idle: its sliding window ends unless used; kind absolute: the chain's absolute lifetime ends). Only chains lapsing within 7 days have a series.",
				[]string{"connection", "kind"}, nil),
		},
	}
	m.registry.MustRegister(m.grpc, m.upstream, m.latency, m.hits, m.misses, m.watches, m.census,
		collectors.NewGoCollector(), collectors.NewProcessCollector(collectors.ProcessCollectorOpts{}))
	return m
}

// Watch makes the census of b part of every scrape.
func (m *Metrics) Watch(b *broker.Broker, now func() time.Time) {
	m.census.b, m.census.now = b, now
}

// Handler serves the registry in the Prometheus text format.
func (m *Metrics) Handler() http.Handler {
	return promhttp.HandlerFor(m.registry, promhttp.HandlerOpts{})
}

// TokenRequest implements [broker.Observer].
func (m *Metrics) TokenRequest(grant, outcome string, d time.Duration) {
	m.upstream.WithLabelValues(grant, outcome).Inc()
	m.latency.WithLabelValues(grant).Observe(d.Seconds())
}

// CacheLookup implements [broker.Observer].
func (m *Metrics) CacheLookup(hit bool) {
	if hit {
		m.hits.Inc()
	} else {
		m.misses.Inc()
	}
}

type censusCollector struct {
	states, expiry, unhealthy, lapse *prometheus.Desc
	b                                *broker.Broker
	now                              func() time.Time
}

func (c *censusCollector) Describe(ch chan<- *prometheus.Desc) {
	ch <- c.states
	ch <- c.expiry
	ch <- c.unhealthy
	ch <- c.lapse
}

func (c *censusCollector) Collect(ch chan<- prometheus.Metric) {
	if c.b == nil {
		return
	}
	census := c.b.Census()
	for st, n := range census.States {
		ch <- prometheus.MustNewConstMetric(c.states, prometheus.GaugeValue, float64(n), string(st))
	}
	now := c.now()
	for name, t := range census.SecretExpiry {
		ch <- prometheus.MustNewConstMetric(c.expiry, prometheus.GaugeValue, t.Sub(now).Seconds(), name)
	}
	for _, u := range census.Unhealthy {
		ch <- prometheus.MustNewConstMetric(c.unhealthy, prometheus.GaugeValue, 1, u.Name, string(u.State), u.Reason)
	}
	for _, l := range census.Lapses {
		ch <- prometheus.MustNewConstMetric(c.lapse, prometheus.GaugeValue, l.At.Sub(now).Seconds(), l.Name, l.Kind)
	}
}
