package client_test

import (
	"testing"
	"time"

	"golang.org/x/oauth2"

	"tokenbroker/client"
)

// BenchmarkCachedToken compares TokenSource.Token on a cached token with
// x/oauth2's ReuseTokenSource over a static token, the cheapest token source
// x/oauth2 has: one goroutine ("serial") and every CPU at once
// ("parallel"). Both are measured in the same run, in alternating slices,
// and the ratio is the client's time over ReuseTokenSource's.
func BenchmarkCachedToken(b *testing.B) {
	r := newRig(rigOptions{})
	defer r.close()
	c := client.New(r.dial())
	defer c.Close()
	ts := c.TokenSource(erp)
	tok, err := ts.Token()
	if err != nil {
		b.Fatal(err)
	}
	reuse := oauth2.ReuseTokenSource(nil, oauth2.StaticTokenSource(tok))
	if _, err := reuse.Token(); err != nil {
		b.Fatal(err)
	}
	b.Run("serial", func(b *testing.B) {
		ratio(b, func(n int) {
			for range n {
				ts.Token()
			}
		}, func(n int) {
			for range n {
				reuse.Token()
			}
		})
	})
	b.Run("parallel", func(b *testing.B) {
		parallel := func(src oauth2.TokenSource) func(int) {
			return func(n int) {
				per := max(n/8, 1)
				done := make(chan struct{})
				for range 8 {
					go func() {
						for range per {
							src.Token()
						}
						done <- struct{}{}
					}()
				}
				for range 8 {
					<-done
				}
			}
		}
		ratio(b, parallel(ts), parallel(reuse))
	})
}

// ratio runs ours and base for b.N calls each, in slices of 10,000 that
// alternate, and reports both per call and ours/base.
func ratio(b *testing.B, ours, base func(n int)) {
	const slice = 10000
	var tOurs, tBase time.Duration
	b.ResetTimer()
	for done := 0; done < b.N; done += slice {
		n := min(slice, b.N-done)
		start := time.Now()
		ours(n)
		tOurs += time.Since(start)
		start = time.Now()
		base(n)
		tBase += time.Since(start)
	}
	b.StopTimer()
	b.ReportMetric(float64(tOurs.Nanoseconds())/float64(b.N), "client-ns/token")
	b.ReportMetric(float64(tBase.Nanoseconds())/float64(b.N), "reuse-ns/token")
	b.ReportMetric(tOurs.Seconds()/tBase.Seconds(), "ratio")
}
