package main

import (
	"slices"
	"time"
)

// Results is everything one run measured: the JSON file beside
// BENCHMARKS.md, which is rendered from it.
type Results struct {
	Command string         `json:"command"`
	Date    string         `json:"date"`
	Machine string         `json:"machine"`
	Runtime string         `json:"runtime"`
	Note    string         `json:"note,omitempty"`
	Targets []Target       `json:"targets"`
	Cached  *CachedResult  `json:"cached,omitempty"`
	Herd    []*HerdResult  `json:"herd,omitempty"` // the main herd last
	Expiry  *ExpiryResult  `json:"expiry,omitempty"`
	Scale   []*ScaleResult `json:"scale,omitempty"`
	Etcd    *EtcdResult    `json:"etcd,omitempty"`
}

// Target is one thing a run must show: Measured against Limit, or against
// Factor times Baseline when the limit is relative to a baseline measured in
// the same run. evaluate fills Limit (for relative targets), Ratio and Met.
type Target struct {
	Section  string  `json:"section"`
	Name     string  `json:"name"`
	Unit     string  `json:"unit"`
	Measured float64 `json:"measured"`
	Op       string  `json:"op"` // "at least", "at most" or "exactly"
	Baseline float64 `json:"baseline,omitempty"`
	Factor   float64 `json:"factor,omitempty"`
	Limit    float64 `json:"limit"`
	// Ratio is Measured over Baseline (relative targets) or over Limit.
	Ratio float64 `json:"ratio"`
	Met   bool    `json:"met"`
	// Note is context reported beside the target, with no verdict.
	Note string `json:"note,omitempty"`
}

// evaluate returns the targets with their limits, ratios and verdicts. A
// relative target compares the ratio with its factor, so that a
// measurement at exactly the factor meets it; one without a positive
// baseline cannot be met.
func evaluate(targets []Target) []Target {
	out := slices.Clone(targets)
	for i := range out {
		t := &out[i]
		got, want := t.Measured, t.Limit
		if t.Factor != 0 {
			t.Limit, t.Ratio = t.Baseline*t.Factor, 0
			if t.Baseline > 0 {
				t.Ratio = t.Measured / t.Baseline
			}
			got, want = t.Ratio, t.Factor
		} else if t.Limit != 0 {
			t.Ratio = t.Measured / t.Limit
		}
		switch t.Op {
		case "at least":
			t.Met = got >= want
		case "at most":
			t.Met = got <= want
		case "exactly":
			t.Met = got == want
		default:
			t.Met = false
		}
		if t.Factor != 0 && t.Baseline <= 0 {
			t.Met = false
		}
	}
	return out
}

// missed counts the targets not met.
func missed(targets []Target) int {
	n := 0
	for _, t := range targets {
		if !t.Met {
			n++
		}
	}
	return n
}

// ms and us are a duration in milliseconds and microseconds, for JSON.
func ms(d time.Duration) float64 { return float64(d) / 1e6 }
func us(d time.Duration) float64 { return float64(d) / 1e3 }

func medianDur(d []time.Duration) time.Duration {
	s := slices.Clone(d)
	slices.Sort(s)
	return s[len(s)/2]
}

// percentiles sorts d and returns its p50 and p99.
func percentiles(d []time.Duration) (p50, p99 time.Duration) {
	slices.Sort(d)
	return d[len(d)/2], d[min(len(d)*99/100, len(d)-1)]
}
