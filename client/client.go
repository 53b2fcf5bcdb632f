// Package client gets Acumatica access tokens from a tokenbroker over gRPC
// for Go services: an [oauth2.TokenSource] that serves from memory and is
// kept fresh by the broker's WatchAccessToken stream, and an HTTP transport
// that applies the broker's 401 rule (report the rejected token once, retry
// once with the newer one). A service needs no token cache of its own.
//
//	cc, _ := grpc.NewClient("tokenbroker:8443", creds)
//	c := client.New(cc)
//	resp, err := c.HTTPClient("tenants/acme/connections/erp").Get(instanceURL + "/entity/Default/24.200.001/SalesOrder")
//
// The package imports gRPC, protobuf and golang.org/x/oauth2 only: none of
// the broker's storage or metrics.
package client

import (
	"context"
	"math/rand/v2"
	"sync"
	"time"

	"golang.org/x/oauth2"
	"google.golang.org/grpc"

	pb "tokenbroker/gen/tokenbroker/v1"
)

// Client gets tokens of any number of connections from one broker. It is
// safe for concurrent use; make one per process and [Client.Close] it on
// shutdown.
type Client struct {
	api  pb.TokenBrokerClient
	opts options
	// elapsed reads the client's clock: time since New, monotonic unless a
	// test set a clock. Cached tokens carry their deadline on it.
	elapsed func() time.Duration

	ctx    context.Context // ends on Close: stops every watch
	cancel context.CancelFunc
	wg     sync.WaitGroup // watch goroutines

	mu      sync.Mutex // guards sources and closed
	sources map[sourceKey]*source
	closed  bool
}

type options struct {
	callTimeout time.Duration
	backoffBase time.Duration
	backoffMax  time.Duration
	idle        time.Duration // a source's watch stops after this long unused; <= 0: never
	now         func() time.Time
	realClock   bool // now is time.Now
}

// Option configures [New].
type Option func(*options)

// WithCallTimeout bounds each GetAccessToken call the client makes when its
// cache cannot serve (default 30 s; the request's own context, when there is
// one, can end it sooner).
func WithCallTimeout(d time.Duration) Option { return func(o *options) { o.callTimeout = d } }

// WithBackoff shapes the waits between reconnections of a watch stream that
// failed: exponential from base to max, with jitter, and never shorter than
// the broker's RetryInfo. Default 200 ms to 30 s.
func WithBackoff(base, max time.Duration) Option {
	return func(o *options) { o.backoffBase, o.backoffMax = base, max }
}

// WithIdleTimeout stops the watch stream of a token source (one connection
// and margin) that has not been asked for a token for d, so that a process
// holds streams only for the connections it uses; the next request for a
// token starts it again. Default 15 min; zero or less keeps every watch
// until [Client.Close].
func WithIdleTimeout(d time.Duration) Option { return func(o *options) { o.idle = d } }

// withClock replaces time.Now, for tests.
func withClock(now func() time.Time) Option {
	return func(o *options) { o.now, o.realClock = now, false }
}

// New returns a client over cc, a connection to the broker (a
// *grpc.ClientConn). It makes no call until a token is first asked for.
// The connection stays the caller's: [Client.Close] does not close it.
func New(cc grpc.ClientConnInterface, opts ...Option) *Client {
	o := options{callTimeout: 30 * time.Second, backoffBase: 200 * time.Millisecond, backoffMax: 30 * time.Second, idle: 15 * time.Minute, now: time.Now, realClock: true}
	for _, opt := range opts {
		opt(&o)
	}
	ctx, cancel := context.WithCancel(context.Background())
	c := &Client{api: pb.NewTokenBrokerClient(cc), opts: o, ctx: ctx, cancel: cancel, sources: map[sourceKey]*source{}}
	epoch := o.now()
	c.elapsed = func() time.Duration { return o.now().Sub(epoch) }
	if o.realClock {
		// One reading of the monotonic clock, half of what time.Now costs.
		c.elapsed = func() time.Duration { return time.Since(epoch) }
	}
	return c
}

// Close stops every watch stream and waits for them to end. Tokens already
// cached are still served while they are valid; anything that needs the
// broker fails with [ErrClosed].
func (c *Client) Close() error {
	c.mu.Lock()
	c.closed = true
	c.mu.Unlock()
	c.cancel()
	c.wg.Wait()
	return nil
}

// TokenOption configures [Client.TokenSource].
type TokenOption func(*sourceKey)

// MinValidFor is the margin: a token is served only while it is valid for
// at least d more, and the broker is asked for tokens valid that long.
// Default 60 s, at most 30 min (the broker's limit). Make it longer than
// the longest request you send with one token.
func MinValidFor(d time.Duration) TokenOption { return func(k *sourceKey) { k.minValid = d } }

// sourceKey identifies one cache: sources of the same connection and
// margin share their token, their watch and their calls.
type sourceKey struct {
	name     string
	minValid time.Duration
}

// TokenSource returns a token source for the connection name (such as
// "tenants/acme/connections/erp"). Its tokens carry their real expiry, and
// the instance URL and scopes as extras ("instance_url", a string;
// "scopes", a []string). Use it with oauth2.NewClient, or see
// [Client.Transport] for the 401 rule. All token sources and transports of
// one connection and margin share one cache and one watch.
func (c *Client) TokenSource(name string, opts ...TokenOption) oauth2.TokenSource {
	return c.source(name, opts...)
}

func (c *Client) source(name string, opts ...TokenOption) *source {
	k := sourceKey{name: name, minValid: 60 * time.Second}
	for _, o := range opts {
		o(&k)
	}
	c.mu.Lock()
	defer c.mu.Unlock()
	if s, ok := c.sources[k]; ok {
		return s
	}
	s := &source{c: c, key: k, calls: map[string]*call{}}
	c.sources[k] = s
	return s
}

// startWatch runs s's watch until Close, until s goes unused or until its
// connection is not found, unless the client is closed.
func (c *Client) startWatch(s *source) {
	c.mu.Lock()
	defer c.mu.Unlock()
	if c.closed {
		return
	}
	c.wg.Add(1)
	go func() {
		defer c.wg.Done()
		s.watch(c.ctx)
	}()
}

// backoff is the wait before reconnection attempt n (from 1), at least
// floor: exponential with full jitter over its upper half.
func (o *options) backoff(n int, floor time.Duration) time.Duration {
	d := o.backoffBase
	for i := 1; i < n && d < o.backoffMax; i++ {
		d *= 2
	}
	d = min(d, o.backoffMax)
	d = d/2 + rand.N(d/2+1)
	return max(d, floor)
}
