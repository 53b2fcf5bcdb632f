package main

import (
	"errors"
	"flag"
	"fmt"
	"io"
	"net"
	"strconv"
	"strings"
	"time"

	"tokenbroker/broker"
	"tokenbroker/internal/gcfloor"
)

// config is the serve command's configuration: flags, each also read from
// TOKENBROKER_<FLAG> in the environment (flags win).
type config struct {
	listen                string
	dataDir               string
	keyFile               string
	tlsCert               string
	tlsKey                string
	clientCA              string
	allowInsecureUpstream bool
	allowUpstreamCIDRs    cidrList
	etcdEndpoints         string
	etcdPrefix            string
	etcdCA                string
	etcdCert              string
	etcdKey               string
	policy                string
	auditLog              string
	metricsListen         string
	healthListen          string
	rateLimit             float64
	rateBurst             int
	reloadInterval        time.Duration
	rejectCooldown        time.Duration
	maxUpstream           int
	maxUpstreamPerHost    int
	gcHeapFloorMiB        int
	logLevel              string
	logFormat             string
	shutdownTimeout       time.Duration
}

func parseConfig(args []string, getenv func(string) string, stderr io.Writer) (*config, error) {
	c := &config{}
	fs := c.flagSet(stderr)
	// Environment first, so that flags given on the command line win.
	if err := applyEnv(fs, getenv); err != nil {
		return nil, err
	}
	if err := fs.Parse(args); err != nil {
		return nil, err
	}
	if fs.NArg() > 0 {
		return nil, fmt.Errorf("unexpected argument %q", fs.Arg(0))
	}
	if err := c.checkTransport(); err != nil {
		return nil, err
	}
	if err := c.checkRanges(); err != nil {
		return nil, err
	}
	if c.rateBurst == 0 {
		c.rateBurst = int(2 * c.rateLimit)
	}
	return c, nil
}

// flagSet defines the serve command's flags on c's fields.
func (c *config) flagSet(stderr io.Writer) *flag.FlagSet {
	fs := flag.NewFlagSet("tokenbroker serve", flag.ContinueOnError)
	fs.SetOutput(stderr)
	fs.StringVar(&c.listen, "listen", "127.0.0.1:50051", "gRPC listen address; beyond loopback only with --tls-cert/--tls-key")
	fs.StringVar(&c.dataDir, "data-dir", "./data", "directory of the bbolt data file (and the generated key file in dev mode)")
	fs.StringVar(&c.keyFile, "key-file", "", "data key file (base64 AES-256 keys, one per line, sealing key first); default <data-dir>/tokenbroker.key, generated on first start. TOKENBROKER_KEY may hold the keys instead")
	fs.StringVar(&c.tlsCert, "tls-cert", "", "server certificate (PEM)")
	fs.StringVar(&c.tlsKey, "tls-key", "", "server private key (PEM)")
	fs.StringVar(&c.clientCA, "client-ca", "", "CA bundle (PEM) that client certificates must chain to; enables mTLS")
	fs.StringVar(&c.etcdEndpoints, "etcd-endpoints", "", "comma-separated etcd endpoints: store connections in etcd and run as one of several replicas (default: bbolt in --data-dir)")
	fs.StringVar(&c.etcdPrefix, "etcd-prefix", "/tokenbroker/", "key prefix in etcd")
	fs.StringVar(&c.etcdCA, "etcd-ca", "", "CA bundle (PEM) for etcd's certificates")
	fs.StringVar(&c.etcdCert, "etcd-cert", "", "client certificate (PEM) for etcd")
	fs.StringVar(&c.etcdKey, "etcd-key", "", "client key (PEM) for etcd")
	fs.StringVar(&c.policy, "policy", "", "authorization policy file (YAML or JSON); required with TLS; reloaded on change")
	fs.StringVar(&c.auditLog, "audit-log", "", "audit log: a file path, or - for stdout; default none")
	fs.StringVar(&c.metricsListen, "metrics-listen", "", "address for Prometheus /metrics and /healthz over HTTP; default off")
	fs.StringVar(&c.healthListen, "health-listen", "", "plaintext gRPC address serving only grpc.health.v1 (for Kubernetes probes); default off")
	fs.Float64Var(&c.rateLimit, "rate-limit", 0, "calls per second each caller may make (0: no limit)")
	fs.IntVar(&c.rateBurst, "rate-burst", 0, "burst above --rate-limit (default 2x the limit)")
	fs.DurationVar(&c.reloadInterval, "reload-interval", 5*time.Second, "how often certificate, key, CA and policy files are checked for changes")
	fs.DurationVar(&c.rejectCooldown, "reject-cooldown", 5*time.Second, "least time between two refreshes of one connection triggered by rejected-token reports (0: no limit)")
	fs.IntVar(&c.maxUpstream, "max-concurrent-upstream", broker.DefaultMaxConcurrentUpstream, "upstream token requests in flight at once, across all connections; the rest queue. Raise it when many connections' tokens may expire together")
	fs.IntVar(&c.maxUpstreamPerHost, "max-concurrent-upstream-per-host", broker.DefaultMaxConcurrentUpstreamPerHost, "upstream token requests in flight at once to one Acumatica server (scheme and host of the instance URL), within --max-concurrent-upstream: a server that stops answering holds no more slots than this")
	fs.IntVar(&c.gcHeapFloorMiB, "gc-heap-floor-mib", gcfloor.Default>>20, "heap size (MiB) below which the Go garbage collector does not run; above it GOGC applies as usual, and GOMEMLIMIT always wins (0: off, GOGC alone); at most a quarter of the cgroup's memory limit")
	fs.BoolVar(&c.allowInsecureUpstream, "allow-insecure-upstream", false, "allow http:// instance URLs beyond loopback, and loopback addresses (tests only)")
	fs.Var(&c.allowUpstreamCIDRs, "allow-upstream-cidr", "address range inside the network (private, link-local, CGNAT ...) that instance URLs may reach, e.g. 10.0.0.0/8; repeat the flag or give a comma-separated list. Default none: such addresses are refused, at input and when connecting")
	fs.StringVar(&c.logLevel, "log-level", "info", "debug, info, warn or error")
	fs.StringVar(&c.logFormat, "log-format", "json", "json or text")
	fs.DurationVar(&c.shutdownTimeout, "shutdown-timeout", 30*time.Second, "how long a graceful stop may take")
	return fs
}

// applyEnv sets each flag from TOKENBROKER_<FLAG> where that is set.
func applyEnv(fs *flag.FlagSet, getenv func(string) string) error {
	var envErr error
	fs.VisitAll(func(f *flag.Flag) {
		name := "TOKENBROKER_" + strings.ToUpper(strings.ReplaceAll(f.Name, "-", "_"))
		if v := getenv(name); v != "" {
			if err := f.Value.Set(v); err != nil && envErr == nil {
				envErr = fmt.Errorf("%s: %w", name, err)
			}
			if l, ok := f.Value.(interface{ setFromEnvironment() }); ok {
				l.setFromEnvironment() // a list flag on the command line replaces it
			}
		}
	})
	return envErr
}

// checkTransport refuses TLS settings that do not go together, and
// plaintext beyond loopback.
func (c *config) checkTransport() error {
	if (c.tlsCert == "") != (c.tlsKey == "") {
		return errors.New("--tls-cert and --tls-key go together")
	}
	if c.clientCA != "" && c.tlsCert == "" {
		return errors.New("--client-ca needs --tls-cert and --tls-key")
	}
	if c.policy != "" && c.clientCA == "" {
		return errors.New("--policy needs --client-ca: caller identities come from client certificates")
	}
	if c.tlsCert != "" && c.policy == "" {
		return errors.New("--tls-cert needs --policy: without one every caller would be an operator (dev mode is for plaintext loopback only)")
	}
	if c.tlsCert == "" && !loopback(c.listen) {
		return fmt.Errorf("refusing to listen on %s without TLS: callers' tokens would cross the network in plain text; give --tls-cert/--tls-key (and --client-ca), or listen on 127.0.0.1", c.listen)
	}
	return nil
}

// Upper bounds of the numeric flags: far above any sane setting, low
// enough that a slip of the finger (an extra few zeros, a unit mix-up) is
// caught at start rather than found in production.
const (
	maxRate     = 1_000_000 // calls per second per caller
	maxInFlight = 100_000   // upstream requests at once
	maxFloorMiB = 1 << 20   // 1 TiB
	maxWait     = time.Hour // reload interval, cooldown, shutdown
)

// checkRanges refuses a numeric flag outside its range, naming the flag
// and the range: a negative --rate-limit would otherwise serve with no
// limit at all.
func (c *config) checkRanges() error {
	for _, err := range []error{
		inRange("--rate-limit", c.rateLimit, 0, maxRate, "0: no limit"),
		inRange("--rate-burst", c.rateBurst, 0, 2*maxRate, "0: twice --rate-limit"),
		inRange("--reload-interval", c.reloadInterval, 10*time.Millisecond, maxWait, ""),
		inRange("--reject-cooldown", c.rejectCooldown, 0, maxWait, "0: no limit"),
		inRange("--max-concurrent-upstream", c.maxUpstream, 1, maxInFlight, ""),
		inRange("--max-concurrent-upstream-per-host", c.maxUpstreamPerHost, 1, maxInFlight, ""),
		inRange("--gc-heap-floor-mib", c.gcHeapFloorMiB, 0, maxFloorMiB, "0: off"),
		inRange("--shutdown-timeout", c.shutdownTimeout, 0, maxWait, "0: stop at once"),
	} {
		if err != nil {
			return err
		}
	}
	return nil
}

// inRange returns an error naming flag and the range [lo, hi] unless v is
// in it (NaN is not). note says what a special value means.
func inRange[T int | float64 | time.Duration](flag string, v, lo, hi T, note string) error {
	if v >= lo && v <= hi {
		return nil
	}
	allowed := "allowed: " + show(lo) + " to " + show(hi)
	if note != "" {
		allowed += "; " + note
	}
	switch {
	case v < lo && lo == 0:
		return fmt.Errorf("%s must not be negative, not %s (%s)", flag, show(v), allowed)
	case v < lo:
		return fmt.Errorf("%s must be at least %s, not %s (%s)", flag, show(lo), show(v), allowed)
	case v > hi:
		return fmt.Errorf("%s must be at most %s, not %s (%s)", flag, show(hi), show(v), allowed)
	}
	return fmt.Errorf("%s must be a number, not %s (%s)", flag, show(v), allowed)
}

// show writes a flag's value as it would be given on the command line.
func show[T int | float64 | time.Duration](v T) string {
	switch v := any(v).(type) {
	case float64:
		return strconv.FormatFloat(v, 'f', -1, 64)
	case time.Duration:
		return v.String()
	default:
		return fmt.Sprint(v)
	}
}

// loopback reports whether addr's host is a loopback address or localhost.
func loopback(addr string) bool {
	host, _, err := net.SplitHostPort(addr)
	if err != nil {
		return false
	}
	if host == "localhost" {
		return true
	}
	ip := net.ParseIP(host)
	return ip != nil && ip.IsLoopback()
}
