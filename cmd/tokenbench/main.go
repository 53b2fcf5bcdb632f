// Command tokenbench measures tokenbroker against baselines measured in the
// same run on the same machine, evaluates its targets, and writes the
// results as JSON and a markdown report rendered from them:
//
//	go run ./cmd/tokenbench                 # everything (about 4 minutes on 2 cores)
//	go run ./cmd/tokenbench -quick          # a smoke run with small sizes
//	go run ./cmd/tokenbench -sections herd,scale
//	go run ./cmd/tokenbench -render BENCHMARKS.json   # the report again, from results
//
// Sections: cached (cached GetAccessToken against a bare gRPC echo), herd
// (callers on an expired token; many connections expiring at once), scale
// (1k/10k/100k connections, the real binary), etcd (a refresh's storage
// work). What each measures and why: docs/benchmarks.md.
package main

import (
	"bytes"
	"cmp"
	"encoding/json"
	"flag"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"runtime"
	"slices"
	"strconv"
	"strings"
	"time"

	"tokenbroker/internal/gcfloor"
)

var (
	out          = flag.String("out", "BENCHMARKS.md", "report file; the results go beside it with the extension .json")
	renderFrom   = flag.String("render", "", "render the report from this results file instead of measuring")
	quick        = flag.Bool("quick", false, "small sizes and short runs (smoke test, not for numbers)")
	sections     = flag.String("sections", "cached,herd,scale,etcd", "sections to run")
	dur          = flag.Duration("duration", 2*time.Second, "length of one cached-path measurement")
	runs         = flag.Int("runs", 3, "runs per cached-path figure, and half the herds of each kind (median taken)")
	concs        = flag.String("concurrency", "1,16,64,256", "cached-path concurrency levels")
	herdN        = flag.Int("herd", 10000, "callers in the thundering herd")
	sweep        = flag.String("herd-sweep", "10,100,1000", "smaller herds measured the same way")
	expiryN      = flag.Int("expiry", 1000, "connections whose tokens expire together, one caller each")
	latency      = flag.Duration("latency", 50*time.Millisecond, "added upstream latency in the herds")
	scale        = flag.String("scale", "1000,10000,100000", "connection counts for the scale section")
	etcdSamples  = flag.Int("etcd-samples", 300, "refreshes' storage work timed on etcd and bbolt")
	note         = flag.String("note", "", "a note on the run for the report, such as what else the machine was running")
	heapFloorMiB = flag.Int("gc-heap-floor-mib", gcfloor.Default>>20, "GC heap floor of the bench process, whose in-process servers stand for tokenbroker serve; 0: GOGC alone")
)

func main() {
	defer func() {
		if r := recover(); r != nil {
			failure, ok := r.(benchFailure)
			if !ok {
				panic(r)
			}
			fmt.Fprintln(os.Stderr, "tokenbench:", failure.err)
			os.Exit(1)
		}
	}()
	flag.Parse()
	if *quick {
		*dur, *runs, *herdN, *sweep, *scale, *etcdSamples, *expiryN = 200*time.Millisecond, 1, 500, "10", "1000", 20, 20
	}
	jsonPath := strings.TrimSuffix(*out, filepath.Ext(*out)) + ".json"
	res := &Results{}
	if *renderFrom != "" {
		check(json.Unmarshal(must(os.ReadFile(*renderFrom)), res))
	} else {
		// The in-process servers run as the binary does, with its heap
		// floor; it is process-wide, so the bench clients share it.
		if *heapFloorMiB > 0 {
			defer gcfloor.Start(uint64(*heapFloorMiB) << 20).Stop()
		}
		res = measure()
		check(os.WriteFile(jsonPath, append(must(json.MarshalIndent(res, "", "  ")), '\n'), 0o644))
	}
	var md bytes.Buffer
	check(render(&md, res))
	check(os.WriteFile(*out, md.Bytes(), 0o644))
	logf("wrote %s from %s: %d of %d targets missed", *out, cmp.Or(*renderFrom, jsonPath), missed(res.Targets), len(res.Targets))
}

// measure runs the sections asked for and evaluates their targets.
func measure() *Results {
	tmp := must(os.MkdirTemp("", "tokenbench"))
	defer os.RemoveAll(tmp)
	args := slices.Clone(os.Args[1:])
	for i, a := range args {
		if strings.ContainsAny(a, " '\"") {
			args[i] = strconv.Quote(a)
		}
	}
	res := &Results{Command: strings.Join(append([]string{"go run ./cmd/tokenbench"}, args...), " "), Date: time.Now().UTC().Format(time.RFC3339), Note: *note}
	var targets []Target
	want := func(section string) bool { return slices.Contains(strings.Split(*sections, ","), section) }
	if want("cached") {
		c := &CachedResult{Runs: *runs, Seconds: dur.Seconds()}
		c.Plaintext = benchCached(mkdir(tmp, "cached"), false, ints(*concs), *runs, *dur)
		c.MutualTLS = benchCached(mkdir(tmp, "cached-mtls"), true, ints(*concs), *runs, *dur)
		res.Cached, targets = c, append(targets, c.targets()...)
	}
	if want("herd") {
		for _, n := range append(ints(*sweep), *herdN) {
			h := benchHerd(mkdir(tmp, fmt.Sprintf("herd-%d", n)), n, 2**runs, *latency)
			logf("herd of %d: upstream calls %v, parked %.1f ms (no-op %.1f ms)", n, h.UpstreamCalls, h.ParkedMS, h.ParkedNoopMS)
			res.Herd = append(res.Herd, h)
		}
		res.Expiry = benchExpiry(mkdir(tmp, "expiry"), *expiryN, *latency)
		targets = append(append(targets, herdTargets(res.Herd)...), res.Expiry.targets()...)
	}
	if want("scale") {
		bin := filepath.Join(tmp, "tokenbroker")
		if out, err := exec.Command("go", "build", "-o", bin, "./cmd/tokenbroker").CombinedOutput(); err != nil {
			check(fmt.Errorf("build tokenbroker: %v\n%s", err, out))
		}
		for _, n := range ints(*scale) {
			s := benchScale(tmp, bin, n)
			res.Scale, targets = append(res.Scale, s), append(targets, s.targets()...)
		}
	}
	if want("etcd") {
		res.Etcd = benchEtcd(mkdir(tmp, "etcd"), *etcdSamples)
	}
	res.Targets, res.Machine = evaluate(targets), machine()
	res.Runtime = fmt.Sprintf("GC heap floor %d MiB (tokenbroker serve's default; the in-process servers and clients share it), GOGC=%s, GOMEMLIMIT=%s",
		*heapFloorMiB, cmp.Or(os.Getenv("GOGC"), "100"), cmp.Or(os.Getenv("GOMEMLIMIT"), "none"))
	return res
}

func logf(format string, args ...any) { fmt.Fprintf(os.Stderr, "tokenbench: "+format+"\n", args...) }

// benchFailure is a measurement that failed: check panics with it, which
// unwinds the sections (their deferred cleanups run) to main.
type benchFailure struct{ err error }

// check ends the run on err, from the goroutine that runs the sections.
func check(err error) {
	if err != nil {
		panic(benchFailure{err})
	}
}

// must is v, or the end of the run on err.
func must[T any](v T, err error) T {
	check(err)
	return v
}

// errOf drops a value and keeps the error.
func errOf[T any](_ T, err error) error { return err }

func mkdir(root, name string) string {
	d := filepath.Join(root, name)
	check(os.MkdirAll(d, 0o700))
	return d
}

func ints(s string) []int {
	var out []int
	for _, f := range strings.Split(s, ",") {
		if f = strings.TrimSpace(f); f != "" {
			n, err := strconv.Atoi(f)
			check(err)
			out = append(out, n)
		}
	}
	return out
}

// machine describes the CPU, memory, kernel and Go of this machine.
func machine() string {
	read := func(path string) string { b, _ := os.ReadFile(path); return string(b) }
	model, mem := "unknown CPU", ""
	for _, l := range strings.Split(read("/proc/cpuinfo"), "\n") {
		if v, ok := strings.CutPrefix(l, "model name"); ok {
			model = strings.TrimSpace(strings.TrimPrefix(strings.TrimSpace(v), ":"))
			break
		}
	}
	if v, ok := strings.CutPrefix(strings.Split(read("/proc/meminfo"), "\n")[0], "MemTotal:"); ok {
		mem = strings.TrimSpace(v)
	}
	return fmt.Sprintf("%d CPUs (%s), %s memory, Linux %s, %s %s/%s", runtime.NumCPU(), model, mem,
		strings.TrimSpace(read("/proc/sys/kernel/osrelease")), runtime.Version(), runtime.GOOS, runtime.GOARCH)
}
