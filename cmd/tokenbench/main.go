// Command tokenbench measures tokenbroker against baselines measured in the
// same run on the same machine, and writes BENCHMARKS.md with a latency
// plot:
//
//	go run ./cmd/tokenbench                 # everything (about 10 minutes on 2 cores)
//	go run ./cmd/tokenbench -quick          # a smoke run with small sizes
//	go run ./cmd/tokenbench -sections herd,scale
//
// Sections: cached (cached GetAccessToken vs a no-op RPC on the same server
// stack), herd (10,000 callers on an expired token), economy (a simulated
// day of 1,000 connections), baseline (services with their own x/oauth2
// token sources vs the broker), scale (1k/10k/100k connections).
package main

import (
	"cmp"
	"flag"
	"fmt"
	"image/color"
	"os"
	"os/exec"
	"path/filepath"
	"runtime"
	"runtime/pprof"
	"strconv"
	"strings"
	"time"

	"tokenbroker/internal/gcfloor"
)

func main() {
	out := flag.String("out", "BENCHMARKS.md", "report file")
	plot := flag.String("plot", "cmd/tokenbench/results/latency.png", "latency plot (PNG)")
	quick := flag.Bool("quick", false, "small sizes and short runs (smoke test, not for numbers)")
	sections := flag.String("sections", "cached,herd,economy,baseline,scale,etcd", "sections to run")
	dur := flag.Duration("duration", 2*time.Second, "length of one cached-path measurement")
	runs := flag.Int("runs", 3, "runs per cached-path figure (median taken)")
	concFlag := flag.String("concurrency", "1,16,64,256", "cached-path concurrency levels")
	herdN := flag.Int("herd", 10000, "callers in the thundering herd")
	expiryN := flag.Int("expiry", 1000, "connections whose tokens expire together, one caller each (herd section)")
	hungN := flag.Int("hung", 200, "connections on a healthy server expiring together while another server hangs (herd section)")
	sweepFlag := flag.String("herd-sweep", "10,100,1000", "smaller herd sizes measured the same way, to show how the herd's time grows with its size")
	latency := flag.Duration("latency", 50*time.Millisecond, "added upstream latency in the herd")
	econN := flag.Int("economy-conns", 1000, "connections in the simulated day")
	econH := flag.Int("economy-hours", 24, "simulated hours")
	scaleFlag := flag.String("scale", "1000,10000,100000", "connection counts for the scale section")
	etcdConns := flag.Int("etcd-conns", 10000, "connections loaded from etcd and bbolt in the etcd section")
	etcdSamples := flag.Int("etcd-samples", 300, "refreshes' storage work timed on each store in the etcd section")
	etcdHerd := flag.Int("etcd-herd", 1000, "callers in the herd across two replicas on etcd")
	cpuProfile := flag.String("cpuprofile", "", "write a CPU profile of the whole run to this file")
	heapFloor := flag.Int("gc-heap-floor-mib", gcfloor.Default>>20, "GC heap floor of the bench process, whose in-process servers stand for tokenbroker serve (its --gc-heap-floor-mib); 0: GOGC alone")
	flag.Parse()
	// The in-process servers run as the binary does, with its heap floor;
	// it is process-wide, so the bench clients share it.
	if *heapFloor > 0 {
		defer gcfloor.Start(uint64(*heapFloor) << 20).Stop()
	}
	if *cpuProfile != "" {
		f, err := os.Create(*cpuProfile)
		if err != nil {
			fail(err)
		}
		if err := pprof.StartCPUProfile(f); err != nil {
			fail(err)
		}
		defer pprof.StopCPUProfile()
	}
	if *quick {
		*dur, *runs, *herdN, *econN, *econH, *scaleFlag, *sweepFlag = 200*time.Millisecond, 1, 500, 20, 3, "1000", "10"
		*etcdConns, *etcdSamples, *etcdHerd, *expiryN, *hungN = 200, 20, 50, 50, 20
	}
	logf := func(format string, args ...any) { fmt.Fprintf(os.Stderr, "tokenbench: "+format+"\n", args...) }
	want := map[string]bool{}
	for _, s := range strings.Split(*sections, ",") {
		want[strings.TrimSpace(s)] = true
	}
	tmp, err := os.MkdirTemp("", "tokenbench")
	if err != nil {
		fail(err)
	}
	defer os.RemoveAll(tmp)

	rep := &report{command: "go run ./cmd/tokenbench " + strings.Join(os.Args[1:], " "), started: time.Now()}
	if want["cached"] {
		concs := ints(*concFlag)
		points, err := benchCached(mkdir(tmp, "cached"), false, concs, *runs, *dur, logf)
		if err != nil {
			fail(err)
		}
		tlsPoints, err := benchCached(mkdir(tmp, "cached-mtls"), true, concs, *runs, *dur, logf)
		if err != nil {
			fail(err)
		}
		rep.cached, rep.cachedTLS, rep.concs, rep.runs, rep.dur = points, tlsPoints, concs, *runs, *dur
		if err := os.MkdirAll(filepath.Dir(*plot), 0o755); err != nil {
			fail(err)
		}
		blue, orange := color.RGBA{31, 119, 180, 255}, color.RGBA{255, 127, 14, 255}
		green, red := color.RGBA{44, 160, 44, 255}, color.RGBA{214, 39, 40, 255}
		var lines []series
		lines = append(lines, latencySeries(points, "", blue, orange)...)
		lines = append(lines, latencySeries(tlsPoints, " (mTLS)", green, red)...)
		if err := plotLatency(*plot, concs, lines); err != nil {
			fail(err)
		}
		rep.plot = *plot
	}
	if want["herd"] {
		r, err := benchHerd(mkdir(tmp, "herd"), *herdN, *runs, *latency)
		if err != nil {
			fail(err)
		}
		rep.herd = r
		logf("herd: %d callers, upstream calls per herd %v, released: last caller after %v (no-op %v); parked: %v (no-op %v)",
			r.callers, r.upstreamCalls, r.lastCaller, r.noopHerd, r.parked, r.parkedNoop)
		for _, n := range ints(*sweepFlag) {
			r, err := benchHerd(mkdir(tmp, fmt.Sprintf("herd-%d", n)), n, *runs, *latency)
			if err != nil {
				fail(err)
			}
			rep.herdSweep = append(rep.herdSweep, r)
			logf("herd of %d: upstream calls per herd %v, released %v (no-op %v), parked %v (no-op %v)",
				n, r.upstreamCalls, r.lastCaller, r.noopHerd, r.parked, r.parkedNoop)
		}
		if *expiryN > 0 {
			e, err := benchExpiry(mkdir(tmp, "expiry"), *expiryN, *latency)
			if err != nil {
				fail(err)
			}
			rep.expiry = e
			logf("expiry: %d connections, %d upstream calls, last caller after %v (upstream floor %v), %d writes in %d commits",
				e.conns, e.upstream, e.elapsed, e.floor, e.writes, e.commits)
		}
		if *hungN > 0 {
			h, err := benchHung(mkdir(tmp, "hung"), *hungN, 2*upstreamCap, *latency)
			if err != nil {
				fail(err)
			}
			rep.hung = h
			for _, r := range h.rows {
				logf("hung: per-host share %d, other server hung %v: %d served, %d failed, last after %v (hung server held %d)",
					r.perHost, r.withHung, r.served, r.failed, r.last, r.held)
			}
		}
	}
	if want["economy"] {
		r, err := benchEconomy(mkdir(tmp, "economy"), *econN, *econH, logf)
		if err != nil {
			fail(err)
		}
		rep.economy = r
	}
	if want["baseline"] {
		d, life := 30*time.Second, 10*time.Second
		if *quick {
			d = 5 * time.Second
		}
		r, err := benchBaseline(mkdir(tmp, "baseline"), 10, 3, d, life)
		if err != nil {
			fail(err)
		}
		rep.baseline = r
		logf("baseline: x/oauth2 %d extra password grants, broker %d", r.oauth2Password, r.brokerPassword)
	}
	if want["scale"] {
		bin := filepath.Join(tmp, "tokenbroker")
		if out, err := exec.Command("go", "build", "-o", bin, "./cmd/tokenbroker").CombinedOutput(); err != nil {
			fail(fmt.Errorf("build tokenbroker: %v\n%s", err, out))
		}
		for _, n := range ints(*scaleFlag) {
			r, err := benchScale(tmp, bin, n, logf)
			if err != nil {
				fail(err)
			}
			rep.scale = append(rep.scale, r)
			os.RemoveAll(filepath.Join(tmp, fmt.Sprintf("scale-%d", n)))
		}
	}
	if want["etcd"] {
		r, err := benchEtcd(mkdir(tmp, "etcd"), *etcdConns, *etcdSamples, *etcdHerd, *runs, *latency, logf)
		if err != nil {
			fail(err)
		}
		rep.etcd = r
	}
	rep.machine = machine()
	rep.runtime = fmt.Sprintf("GC heap floor %d MiB (tokenbroker serve's default; the in-process servers and clients share it), GOGC=%s, GOMEMLIMIT=%s",
		*heapFloor, cmp.Or(os.Getenv("GOGC"), "100"), cmp.Or(os.Getenv("GOMEMLIMIT"), "none"))
	if err := os.WriteFile(*out, []byte(rep.markdown()), 0o644); err != nil {
		fail(err)
	}
	logf("wrote %s", *out)
	if rep.failed() {
		logf("some targets were missed; see %s", *out)
	}
}

// latencySeries are the p50 and p99 lines of the no-op and the cached path.
func latencySeries(points []cachedPoint, suffix string, noop, cached color.RGBA) []series {
	var tp50, tp99, np50, np99 []time.Duration
	for _, p := range points {
		tp50, tp99 = append(tp50, p.token.p50), append(tp99, p.token.p99)
		np50, np99 = append(np50, p.noop.p50), append(np99, p.noop.p99)
	}
	return []series{
		{"no-op RPC p50" + suffix, noop, false, np50}, {"no-op RPC p99" + suffix, noop, true, np99},
		{"cached GetAccessToken p50" + suffix, cached, false, tp50}, {"cached GetAccessToken p99" + suffix, cached, true, tp99},
	}
}

func mkdir(root, name string) string {
	d := filepath.Join(root, name)
	if err := os.MkdirAll(d, 0o700); err != nil {
		fail(err)
	}
	return d
}

func ints(s string) []int {
	var out []int
	for _, f := range strings.Split(s, ",") {
		if strings.TrimSpace(f) == "" {
			continue
		}
		n, err := strconv.Atoi(strings.TrimSpace(f))
		if err != nil {
			fail(fmt.Errorf("bad number %q", f))
		}
		out = append(out, n)
	}
	return out
}

func fail(err error) {
	fmt.Fprintln(os.Stderr, "tokenbench:", err)
	os.Exit(1)
}

func machine() string {
	var b strings.Builder
	model := "unknown CPU"
	if data, err := os.ReadFile("/proc/cpuinfo"); err == nil {
		for _, l := range strings.Split(string(data), "\n") {
			if v, ok := strings.CutPrefix(l, "model name"); ok {
				model = strings.TrimSpace(strings.TrimPrefix(strings.TrimSpace(v), ":"))
				break
			}
		}
	}
	mem := ""
	if data, err := os.ReadFile("/proc/meminfo"); err == nil {
		mem = strings.TrimSpace(strings.TrimPrefix(strings.Split(string(data), "\n")[0], "MemTotal:"))
	}
	kernel := ""
	if data, err := os.ReadFile("/proc/sys/kernel/osrelease"); err == nil {
		kernel = strings.TrimSpace(string(data))
	}
	fmt.Fprintf(&b, "%d CPUs (%s), %s memory, Linux %s, %s %s/%s", runtime.NumCPU(), model, mem, kernel, runtime.Version(), runtime.GOOS, runtime.GOARCH)
	return b.String()
}
