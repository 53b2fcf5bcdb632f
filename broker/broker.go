package broker

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"net/http"
	"net/netip"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"go.opentelemetry.io/otel/trace"
	"go.opentelemetry.io/otel/trace/noop"

	"tokenbroker/storage"
)

// Options configure [New]. Zero fields mean the documented defaults.
type Options struct {
	// Store keeps connections durably. Required.
	Store Store
	// Now returns the current time. Default time.Now.
	Now func() time.Time
	// Logger receives operational events; never secrets. Default discards.
	Logger *slog.Logger
	// Transport carries upstream HTTP requests. Default a clone of
	// http.DefaultTransport. An *http.Transport is cloned and its
	// connections' addresses checked against the upstream rules.
	Transport http.RoundTripper
	// UpstreamTimeout bounds one upstream HTTP request. Default 30 s.
	UpstreamTimeout time.Duration
	// RefreshTimeout bounds one shared refresh with its retries, on the
	// broker's own context. Default 2 min.
	RefreshTimeout time.Duration
	// MaxAttempts bounds the upstream attempts of one shared refresh.
	// Default 3.
	MaxAttempts int
	// BackoffBase and BackoffMax shape the exponential backoff with jitter
	// between attempts on transient failures. Default 1 s and 5 min.
	BackoffBase time.Duration
	BackoffMax  time.Duration
	// LoginLimitBackoff is the first wait after an "API Login Limit" answer;
	// it doubles up to 30 min. Default 1 min.
	LoginLimitBackoff time.Duration
	// MaxConcurrentUpstream caps upstream calls across all connections.
	// Default 32.
	MaxConcurrentUpstream int
	// MaxConcurrentUpstreamPerHost caps upstream calls to one host (the
	// scheme and host of instance URLs), within MaxConcurrentUpstream: a
	// server that hangs holds no more slots than this. Default 8.
	MaxConcurrentUpstreamPerHost int
	// TickInterval is how often the maintenance loop looks for tokens to
	// renew. Default 1 s; negative disables the loop (tests call
	// [Broker.Maintain] themselves). Tokens in use are renewed once past
	// 75% of their lifetime, so tokens that live less than about four ticks
	// may lapse first: callers then share one refresh on demand.
	TickInterval time.Duration
	// KeepAliveAfter is how long an idle refresh token may go unused before
	// the broker refreshes it, capped at half the sliding lifetime. Default
	// 7 days.
	KeepAliveAfter time.Duration
	// DefaultSlidingLifetime applies to connections that set none. Default
	// 15 days.
	DefaultSlidingLifetime time.Duration
	// AllowInsecureUpstream allows http:// instance URLs beyond loopback,
	// and loopback addresses.
	AllowInsecureUpstream bool
	// AllowUpstreamCIDRs are address ranges inside the network that
	// instance URLs may reach (see [UpstreamRules]). Default none.
	AllowUpstreamCIDRs []netip.Prefix
	// Sleep waits between attempts. Default a timer that ctx can cut short.
	Sleep func(ctx context.Context, d time.Duration) error
	// Observer receives measurements. Default none.
	Observer Observer
	// RejectCooldown is the least time between two refreshes triggered by
	// rejected-token reports on one connection: a caller that reports every
	// fresh token as rejected must not turn into a refresh storm. Default
	// 5 s; negative disables.
	RejectCooldown time.Duration
	// Locker serializes upstream calls of a connection across replicas.
	// Default none (one process, as with bbolt).
	Locker Locker
	// Watcher feeds other replicas' changes into this one's memory.
	// Default none.
	Watcher Watcher
	// TracerProvider traces upstream requests (token, discovery,
	// revocation, logout, TestConnection reads), each a child of the
	// caller's span that caused it. Default none (a no-op provider).
	TracerProvider trace.TracerProvider
	// EventRing is how many recent connection events are kept for
	// watchers that resume. Default [DefaultEventRing].
	EventRing int
	// Authorizations keeps Authorization Code flows started and not yet
	// completed, so that any replica can complete them (the etcd store).
	// Default this process's memory.
	Authorizations AuthorizationStore
}

// Defaults of the upstream caps in [Options].
const (
	DefaultMaxConcurrentUpstream        = 32
	DefaultMaxConcurrentUpstreamPerHost = 8
)

func (o *Options) setDefaults() {
	if o.Now == nil {
		o.Now = time.Now
	}
	if o.Logger == nil {
		o.Logger = slog.New(slog.DiscardHandler)
	}
	if o.UpstreamTimeout <= 0 {
		o.UpstreamTimeout = 30 * time.Second
	}
	if o.RefreshTimeout <= 0 {
		o.RefreshTimeout = 2 * time.Minute
	}
	if o.MaxAttempts <= 0 {
		o.MaxAttempts = 3
	}
	if o.BackoffBase <= 0 {
		o.BackoffBase = time.Second
	}
	if o.BackoffMax <= 0 {
		o.BackoffMax = 5 * time.Minute
	}
	if o.LoginLimitBackoff <= 0 {
		o.LoginLimitBackoff = time.Minute
	}
	if o.MaxConcurrentUpstream <= 0 {
		o.MaxConcurrentUpstream = DefaultMaxConcurrentUpstream
	}
	if o.MaxConcurrentUpstreamPerHost <= 0 {
		o.MaxConcurrentUpstreamPerHost = DefaultMaxConcurrentUpstreamPerHost
	}
	if o.TickInterval == 0 {
		o.TickInterval = time.Second
	}
	if o.KeepAliveAfter <= 0 {
		o.KeepAliveAfter = 7 * 24 * time.Hour
	}
	if o.DefaultSlidingLifetime <= 0 {
		o.DefaultSlidingLifetime = 15 * 24 * time.Hour
	}
	if o.Sleep == nil {
		o.Sleep = sleepCtx
	}
	if o.Observer == nil {
		o.Observer = nopObserver{}
	}
	if o.TracerProvider == nil {
		o.TracerProvider = noop.NewTracerProvider()
	}
	if o.RejectCooldown == 0 {
		o.RejectCooldown = 5 * time.Second
	}
}

func sleepCtx(ctx context.Context, d time.Duration) error {
	t := time.NewTimer(d)
	defer t.Stop()
	select {
	case <-t.C:
		return nil
	case <-ctx.Done():
		return ctx.Err()
	}
}

// Broker holds every connection and serves their tokens.
type Broker struct {
	opts  Options
	store Store
	now   func() time.Time
	log   *slog.Logger
	up    *upstream
	slots *slots // caps on concurrent upstream calls, global and per host

	conns sync.Map // name -> *conn; read without locks on the cached path

	loading atomic.Bool // Load is not done: lookups may read the store
	tombs   sync.Map    // names deleted while Load runs, so it does not bring them back

	creatingMu sync.Mutex          // guards creating
	creating   map[string]struct{} // names with a CreateConnection in progress

	auths AuthorizationStore // Authorization Code flows started and not yet completed

	flights sync.WaitGroup // shared refreshes in progress
	stop    chan struct{}
	loop    sync.WaitGroup
	closed  atomic.Bool
	once    sync.Once

	stats Stats

	events *feed // connection events for WatchConnections (events.go)
}

// Stats are counters for tests, benchmarks and metrics.
type Stats struct {
	UpstreamRefresh  atomic.Int64 // refresh grants sent
	UpstreamPassword atomic.Int64 // password grants sent
	UpstreamCode     atomic.Int64 // authorization_code grants sent
	UpstreamFailures atomic.Int64 // failed upstream token requests
	CommitFailures   atomic.Int64 // failed durable writes
}

// flight is one shared refresh; waiters read err after done is closed.
type flight struct {
	done chan struct{}
	why  trigger
	gen  int64 // token generation when the flight was decided on
	err  error
	// parent is the span of the caller that started the flight: the
	// flight runs on the broker's own context, but its upstream requests
	// are traced as children of the call that caused them.
	parent trace.SpanContext
}

// trigger says why a shared refresh runs.
type trigger int

const (
	triggerCaller     trigger = iota + 1 // a caller found no usable token
	triggerRejected                      // a caller reported the token rejected
	triggerProactive                     // an in-use token passed 75% of its life
	triggerKeepAlive                     // an idle refresh token nears its sliding window
	triggerRenewChain                    // the chain nears its absolute lifetime: password grant
	triggerRecover                       // an intent was found at start
	triggerCommit                        // a failed commit is retried
)

// New returns a broker over opts.Store. Call [Broker.Load] to read stored
// connections, then [Broker.Start] for background maintenance.
func New(opts Options) (*Broker, error) {
	if opts.Store == nil {
		return nil, errors.New("broker: Options.Store is required")
	}
	opts.setDefaults()
	b := &Broker{
		opts:     opts,
		store:    opts.Store,
		now:      opts.Now,
		log:      opts.Logger,
		up:       newUpstream(opts.UpstreamTimeout, guardTransport(opts.Transport, opts.upstreamRules()), opts.Now, opts.TracerProvider.Tracer(tracerName)),
		slots:    newSlots(opts.MaxConcurrentUpstream, opts.MaxConcurrentUpstreamPerHost),
		creating: map[string]struct{}{},
		stop:     make(chan struct{}),
		auths:    opts.Authorizations,
	}
	if b.auths == nil {
		b.auths = &memAuthorizations{now: opts.Now, pending: map[string]*storage.Authorization{}}
	}
	b.loading.Store(true) // until Load is done
	b.events = newFeed(b, opts.EventRing)
	return b, nil
}

// Stats returns the broker's counters.
func (b *Broker) Stats() *Stats { return &b.stats }

// Load reads every stored connection into memory (fn of the store's LoadAll
// may run concurrently). Connections whose last upstream request may have
// been interrupted by a crash are marked for recovery and refreshed by the
// next maintenance pass; deletes a crash interrupted are finished (see
// delete.go).
//
// The broker may serve before and while Load runs: until Load is done, a
// connection not yet in memory is read from the store when it is first
// asked for, and a connection deleted meanwhile stays deleted.
func (b *Broker) Load(ctx context.Context) (int, error) {
	defer func() {
		b.loading.Store(false)
		b.tombs.Clear()
		b.events.markLoaded()
	}()
	var loaded atomic.Int64
	var deleting unfinished
	err := b.store.LoadAll(ctx, func(cfg *storage.Connection, tok *storage.Tokens) error {
		if !cfg.DeleteTime.IsZero() {
			deleting.add(cfg, tok)
			return nil
		}
		b.admit(cfg, tok)
		loaded.Add(1)
		return nil
	})
	n := int(loaded.Load())
	if err != nil {
		return n, fmt.Errorf("broker: load: %w", err)
	}
	deleting.finish(ctx, b)
	return n, nil
}

// Start runs the maintenance loop (unless TickInterval is negative) and the
// watch of other replicas' changes (with a Watcher) until [Broker.Close].
func (b *Broker) Start() {
	if b.closed.Load() {
		return
	}
	if b.opts.Watcher != nil {
		ctx, cancel := context.WithCancel(context.Background())
		b.loop.Add(2)
		go func() {
			defer b.loop.Done()
			b.opts.Watcher.Watch(ctx, func(ch storage.Change) { b.apply(ctx, ch) })
		}()
		go func() {
			defer b.loop.Done()
			<-b.stop
			cancel()
		}()
	}
	if b.opts.TickInterval < 0 {
		return
	}
	b.loop.Add(1)
	go func() {
		defer b.loop.Done()
		// Resolve crash recovery and overdue renewals at once, not a tick later.
		b.Maintain()
		t := time.NewTicker(b.opts.TickInterval)
		defer t.Stop()
		for {
			select {
			case <-b.stop:
				return
			case <-t.C:
				b.Maintain()
			}
		}
	}()
}

// Settle waits until no shared refresh is in progress. For tests and
// benchmarks that drive [Broker.Maintain] on a simulated clock; it must not
// run concurrently with calls that start refreshes.
func (b *Broker) Settle() { b.flights.Wait() }

// Close stops maintenance, lets shared refreshes in progress finish and
// commit, and returns. It does not close the store.
func (b *Broker) Close() {
	b.once.Do(func() {
		b.closed.Store(true)
		close(b.stop)
		b.loop.Wait()
		b.flights.Wait()
	})
}

func (b *Broker) lookup(name string) (*conn, error) {
	if v, ok := b.conns.Load(name); ok {
		return v.(*conn), nil
	}
	if b.loading.Load() {
		if c := b.loadOne(context.Background(), name); c != nil {
			return c, nil
		}
	}
	return nil, notFound(name)
}

// etag is a connection's etag: its revision and its create time, so that
// an etag read before a delete and re-create never matches the new one.
func etag(cfg *storage.Connection) string {
	return strconv.FormatInt(cfg.Revision, 10) + "-" + strconv.FormatUint(uint64(cfg.CreateTime.UnixNano()), 36)
}

// ParseETag parses an etag made by the broker, returning its revision; ok
// is false for anything else. A bare revision, as older versions issued,
// parses too, and matches no connection.
func ParseETag(s string) (int64, bool) {
	revPart, inc, hasInc := strings.Cut(s, "-")
	n, err := strconv.ParseInt(revPart, 10, 64)
	if hasInc {
		if _, ierr := strconv.ParseUint(inc, 36, 64); ierr != nil || inc != strings.ToLower(inc) {
			return 0, false
		}
	}
	return n, err == nil && n > 0 && revPart == strconv.FormatInt(n, 10)
}

// withTurn runs fn while holding the connection's turn at the token
// endpoint: in this process, and with a [Locker] across replicas too. Under
// a Locker the token state is first re-read from the store, since another
// replica may have rotated it. Waiting can be abandoned through ctx.
func (b *Broker) withTurn(ctx context.Context, c *conn, fn func() error) error {
	turn := c.turnChan()
	select {
	case turn <- struct{}{}:
	case <-ctx.Done():
		return ctx.Err()
	}
	defer func() { <-turn }()
	if b.opts.Locker != nil {
		unlock, err := b.opts.Locker.Lock(ctx, c.name)
		if err != nil {
			if ctx.Err() != nil {
				return ctx.Err()
			}
			return storageError(c.name, err)
		}
		defer unlock()
		if _, err := b.syncTokens(ctx, c); err != nil {
			return err
		}
	}
	return fn()
}

// syncTokens takes the stored token state if another replica committed a
// newer generation, and reports whether it did.
func (b *Broker) syncTokens(ctx context.Context, c *conn) (bool, error) {
	t, err := b.store.GetTokens(ctx, c.name)
	if errors.Is(err, storage.ErrNotFound) {
		c.mu.Lock()
		c.markDeletedLocked()
		c.mu.Unlock()
		return false, notFound(c.name)
	}
	if err != nil {
		return false, storageError(c.name, err)
	}
	return c.takeNewer(t), nil
}

// apply feeds one change made by any replica into memory.
func (b *Broker) apply(ctx context.Context, ch storage.Change) {
	v, ok := b.conns.Load(ch.Name)
	switch {
	case ch.Deleted:
		if ok {
			c := v.(*conn)
			c.mu.Lock()
			c.markDeletedLocked()
			c.mu.Unlock()
			b.conns.Delete(ch.Name)
		}
		if b.loading.Load() {
			b.tombs.Store(ch.Name, struct{}{})
		}
	case ch.Connection != nil:
		if !ok {
			// Created elsewhere: read its tokens (their event may come first
			// or later on another stream).
			t, err := b.store.GetTokens(ctx, ch.Name)
			if err != nil {
				t = &storage.Tokens{}
			}
			if nc := newConnPublished(ch.Connection, t); !loaded(b.conns.LoadOrStore(ch.Name, nc)) {
				b.events.admitted(nc, true)
			}
			return
		}
		c := v.(*conn)
		c.mu.Lock()
		if ch.Connection.Revision > c.cfg.Revision {
			c.configLocked(ch.Connection)
		}
		c.mu.Unlock()
	case ch.Tokens != nil:
		if ok {
			v.(*conn).takeNewer(ch.Tokens)
		}
	}
}
