package broker

import (
	"testing"
	"time"

	"tokenbroker/storage"
)

// TestWarningThresholds: each warning holds exactly from its threshold on,
// and the refresh token ones only once the broker's own renewal is
// overdue.
func TestWarningThresholds(t *testing.T) {
	now := time.Date(2026, 11, 24, 9, 0, 0, 0, time.UTC)
	b, err := New(Options{Store: openStore(t), Now: func() time.Time { return now }, TickInterval: -1})
	if err != nil {
		t.Fatal(err)
	}
	day := 24 * time.Hour
	cases := []struct {
		name    string
		cfg     func(*storage.Connection)
		tok     func(*storage.Tokens)
		degrade string
		want    warnSet
	}{
		{"healthy", nil, nil, "", 0},
		{"secret in 31 days", func(c *storage.Connection) { c.ClientSecretExpireTime = now.Add(31 * day) }, nil, "", 0},
		{"secret in 30 days", func(c *storage.Connection) { c.ClientSecretExpireTime = now.Add(30 * day) }, nil, "", warnSecret},
		{"secret expired", func(c *storage.Connection) { c.ClientSecretExpireTime = now.Add(-day) }, nil, "", warnSecret},
		// Sliding 15 days: keep-alive at 7 days idle; warning at 3 days left.
		{"idle 11 days", nil, func(t *storage.Tokens) { t.RefreshTokenUseTime = now.Add(-11 * day) }, "", 0},
		{"idle 12 days", nil, func(t *storage.Tokens) { t.RefreshTokenUseTime = now.Add(-12 * day) }, "", warnIdle},
		// Sliding 8 hours: keep-alive at 4 hours; warning at 2 hours left.
		{"short sliding, 5 h idle", func(c *storage.Connection) { c.SlidingLifetime = 8 * time.Hour },
			func(t *storage.Tokens) { t.RefreshTokenUseTime = now.Add(-5 * time.Hour) }, "", 0},
		{"short sliding, 6 h idle", func(c *storage.Connection) { c.SlidingLifetime = 8 * time.Hour },
			func(t *storage.Tokens) { t.RefreshTokenUseTime = now.Add(-6 * time.Hour) }, "", warnIdle},
		// Absolute 30 days: renewal from 5 days left, forced at 4 days;
		// warning at a quarter of the margin, 30 h.
		{"chain 31 h left", func(c *storage.Connection) { c.AbsoluteLifetime = 30 * day },
			func(t *storage.Tokens) { t.ChainStartTime = now.Add(-30*day + 31*time.Hour) }, "", 0},
		{"chain 30 h left", func(c *storage.Connection) { c.AbsoluteLifetime = 30 * day },
			func(t *storage.Tokens) { t.ChainStartTime = now.Add(-30*day + 30*time.Hour) }, "", warnChain},
		{"no refresh token: no lapse warning", func(c *storage.Connection) { c.AbsoluteLifetime = 30 * day },
			func(t *storage.Tokens) { t.RefreshToken, t.ChainStartTime = "", now.Add(-30*day) }, "", 0},
		{"login limit", nil, nil, ReasonLoginLimit, warnLoginLimit},
		{"other upstream failure", nil, nil, ReasonUpstreamUnavailable, 0},
	}
	for _, tc := range cases {
		cfg := testConnection("tenants/t/connections/c", now)
		tok := &storage.Tokens{RefreshToken: "rt", RefreshTokenUseTime: now, ChainStartTime: now}
		if tc.cfg != nil {
			tc.cfg(cfg)
		}
		if tc.tok != nil {
			tc.tok(tok)
		}
		c := newConn(cfg, tok)
		c.rt.degraded = tc.degrade
		if got := b.events.warningsLocked(c, now); got != tc.want {
			t.Errorf("%s: warnings %04b, want %04b", tc.name, got, tc.want)
		}
	}
}

// TestAWatchAllocatesItsBacklogAsItFills: subscribing costs a small
// fraction of a full backlog (maxWatchBacklog events), which an idle
// watch never needs; the baseline is one full backlog allocated in the
// same run.
func TestAWatchAllocatesItsBacklogAsItFills(t *testing.T) {
	b, err := New(Options{Store: openStore(t), TickInterval: -1})
	if err != nil {
		t.Fatal(err)
	}
	f := b.events
	all := func(string) bool { return true }
	watch := testing.Benchmark(func(tb *testing.B) {
		tb.ReportAllocs()
		for range tb.N {
			w, _, _ := f.subscribe(all, 0, "")
			f.unsubscribe(w)
		}
	})
	var sink []Event
	backlog := testing.Benchmark(func(tb *testing.B) {
		tb.ReportAllocs()
		for range tb.N {
			sink = make([]Event, maxWatchBacklog)
		}
	})
	_ = sink
	if ratio := float64(watch.AllocedBytesPerOp()) / float64(backlog.AllocedBytesPerOp()); ratio > 0.05 {
		t.Fatalf("a watch allocates %d B up front, %.2f of a full backlog (%d B); want at most 0.05",
			watch.AllocedBytesPerOp(), ratio, backlog.AllocedBytesPerOp())
	}
}
