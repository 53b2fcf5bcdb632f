package broker

import (
	"context"
	"crypto/rand"
	"encoding/hex"
	"fmt"
	"math/bits"
	"slices"
	"strings"
	"sync"
	"time"
)

// EventType says what an [Event] reports.
type EventType int

// Event types, in the order a watch sees them: the current state first,
// then changes.
const (
	// EventExisting is a connection's state when the watch starts (or
	// resyncs).
	EventExisting EventType = iota + 1
	// EventSynced follows the last EventExisting (or the last replayed
	// event): from here on every change is sent as it happens.
	EventSynced
	// EventCreated: a connection was created (here or on another replica).
	EventCreated
	// EventUpdated: a connection's configuration changed.
	EventUpdated
	// EventDeleted: a connection was deleted; View is its last state.
	EventDeleted
	// EventStateChanged: a connection moved from PrevState to View.State.
	EventStateChanged
	// EventWarning: a warning appeared (WarningCode, Warning).
	EventWarning
)

// Warning codes of [EventWarning].
const (
	// WarningClientSecretExpiring: the client secret expires within 30
	// days (or has expired).
	WarningClientSecretExpiring = "CLIENT_SECRET_EXPIRING"
	// WarningChainEnding: the refresh token chain is near its absolute
	// lifetime and the broker's renewal has not happened.
	WarningChainEnding = "REFRESH_TOKEN_CHAIN_ENDING"
	// WarningIdleLapsing: the refresh token is near the end of its sliding
	// window and the broker's keep-alive refresh has not happened.
	WarningIdleLapsing = "REFRESH_TOKEN_IDLE_LAPSING"
	// WarningLoginLimit: upstream answered "API Login Limit".
	WarningLoginLimit = "LOGIN_LIMIT_REACHED"
)

// Event is one message of [Broker.WatchConnections]. View never holds a
// secret; it is shared between watchers and must not be modified.
type Event struct {
	// Seq orders events of one feed (FeedID): every change has its own,
	// increasing by one. EventExisting and EventSynced carry the sequence
	// the state they show is current to; resume from it.
	Seq    int64
	FeedID string
	Type   EventType
	Time   time.Time
	Name   string
	View   *View // nil for EventSynced
	// PrevState is the state before an EventStateChanged.
	PrevState State
	// WarningCode and Warning describe an EventWarning.
	WarningCode, Warning string
	// Resync: the watcher's sequence could not be resumed (too old, from
	// another feed) or it fell behind: drop what it knows and take the
	// state that follows as current.
	Resync bool
}

// WatchRequest selects what [Broker.WatchConnections] sends.
type WatchRequest struct {
	// Prefix selects connection names that start with it ("" for all).
	Prefix string
	// Allow, when set, selects the names it accepts (the tenants a caller
	// operates).
	Allow func(name string) bool
	// AfterSeq resumes after this sequence of feed FeedID: the events
	// missed are replayed if this is that feed and it still holds them,
	// else (another replica's feed, an older process's, or no FeedID) the
	// watch resyncs. 0 starts with the current state.
	AfterSeq int64
	FeedID   string
}

func (r WatchRequest) match(name string) bool {
	return strings.HasPrefix(name, r.Prefix) && (r.Allow == nil || r.Allow(name))
}

// DefaultEventRing is how many recent events the feed keeps for watchers
// that resume ([Options.EventRing]).
const DefaultEventRing = 4096

// maxWatchBacklog bounds the events queued for one watcher: one that falls
// further behind is resynced, so a slow reader costs the broker no more
// than this.
const maxWatchBacklog = 1024

// Warning thresholds.
const (
	secretWarnWithin = 30 * 24 * time.Hour
	idleWarnWithin   = 3 * 24 * time.Hour
	warnScanEvery    = time.Minute
)

// feed numbers every change of every connection, keeps the latest in a
// ring for watchers that resume, and hands each to the watchers whose
// selection it matches. Emitting never blocks: a watcher whose backlog is
// full is told to resync.
//
// Lock order: a conn's mu, then feed.mu. Events are emitted with the
// connection's mu held, so they are in the order of its transitions.
type feed struct {
	b  *Broker
	id string // names this feed, so a sequence from another process or replica is not resumed

	loaded   chan struct{} // closed when Load is done
	loadOnce sync.Once
	ending   chan struct{} // closed by EndWatches
	endOnce  sync.Once

	mu       sync.Mutex // guards the fields below
	seq      int64
	ring     []Event // the latest events; ring[(seq-1) % len] is the newest
	held     int     // events in ring
	subs     map[*watcher]struct{}
	lastScan time.Time
}

// watcher is one WatchConnections call's place in the feed.
type watcher struct {
	match func(name string) bool
	from  int64 // the feed's sequence when it subscribed
	limit int   // the most events queue holds
	// queue is the backlog, grown as events wait rather than allocated at
	// its bound: most watches are idle, and a full one is ~150 KB.
	mu     sync.Mutex
	queue  []Event
	ready  chan struct{} // holds a signal while queue is not empty
	lagged chan struct{}
	behind bool // lagged is closed; guarded by feed.mu
}

// push queues ev, or reports false when the backlog is full.
func (w *watcher) push(ev Event) bool {
	w.mu.Lock()
	defer w.mu.Unlock()
	if len(w.queue) >= w.limit {
		return false
	}
	w.queue = append(w.queue, ev)
	w.signalLocked()
	return true
}

// pop takes the oldest queued event; ok is false when there is none.
func (w *watcher) pop() (ev Event, ok bool) {
	w.mu.Lock()
	defer w.mu.Unlock()
	if len(w.queue) == 0 {
		return Event{}, false
	}
	ev = w.queue[0]
	w.queue[0] = Event{} // the slot no longer keeps its view alive
	w.queue = w.queue[1:]
	if len(w.queue) == 0 {
		w.queue = nil // an idle watch gives its backlog back
	} else {
		w.signalLocked()
	}
	return ev, true
}

func (w *watcher) signalLocked() {
	select {
	case w.ready <- struct{}{}:
	default: // already signalled
	}
}

// connEvents is what the feed last announced of one connection. Guarded
// by the conn's mu.
type connEvents struct {
	feed     *feed // nil until the connection is live in this broker
	state    State
	warnings warnSet
	lastSeq  int64
}

func newFeed(b *Broker, ring int) *feed {
	if ring <= 0 {
		ring = DefaultEventRing
	}
	var id [8]byte
	rand.Read(id[:])
	return &feed{b: b, id: hex.EncodeToString(id[:]), loaded: make(chan struct{}), ending: make(chan struct{}), ring: make([]Event, ring), subs: map[*watcher]struct{}{}}
}

func (f *feed) markLoaded() { f.loadOnce.Do(func() { close(f.loaded) }) }

// EndWatches ends every WatchConnections call, now and later, with
// [ErrClosed]: a watch never ends by itself, so a graceful stop of the
// server would otherwise wait for it.
func (b *Broker) EndWatches() { b.events.endOnce.Do(func() { close(b.events.ending) }) }

// admitted makes c's changes feed events from now on, starting from its
// present state; announce reports it as created.
func (f *feed) admitted(c *conn, announce bool) {
	c.mu.Lock()
	defer c.mu.Unlock()
	c.ev.feed = f
	c.ev.state = c.stateLocked()
	c.ev.warnings = f.warningsLocked(c, f.b.now())
	if announce {
		f.emitLocked(c, Event{Type: EventCreated})
	}
}

// announceLocked reports what changed in c's state and warnings since the
// last announcement. It runs whenever c publishes.
func (c *conn) announceLocked() {
	f := c.ev.feed
	if f == nil || c.deleted {
		return
	}
	if st := c.stateLocked(); st != c.ev.state {
		prev := c.ev.state
		c.ev.state = st
		f.emitLocked(c, Event{Type: EventStateChanged, PrevState: prev})
	}
	f.warnLocked(c, f.b.now())
}

// announceUpdatedLocked reports a configuration change from revision
// prev. A revision already taken (this replica's own update, seen again
// through the store's watch first) is not reported again.
func (c *conn) announceUpdatedLocked(prev int64) {
	if c.ev.feed != nil && !c.deleted && c.cfg.Revision > prev {
		c.ev.feed.emitLocked(c, Event{Type: EventUpdated})
	}
}

// announceDeletedLocked reports c's deletion, once, with its last state.
func (c *conn) announceDeletedLocked() {
	if c.ev.feed != nil && !c.deleted {
		c.ev.feed.emitLocked(c, Event{Type: EventDeleted})
	}
}

// warnLocked reports each warning of c that was not there at the last
// look.
func (f *feed) warnLocked(c *conn, now time.Time) {
	set := f.warningsLocked(c, now)
	fresh := set &^ c.ev.warnings
	c.ev.warnings = set
	for fresh != 0 {
		w := warnSet(1) << bits.TrailingZeros8(uint8(fresh))
		fresh &^= w
		f.emitLocked(c, Event{Type: EventWarning, WarningCode: w.code(), Warning: f.warningText(c, w, now)})
	}
}

// scan looks for warnings that appeared by the passing of time (a secret
// or a refresh token nearing its end), at most once a minute.
func (f *feed) scan(now time.Time) {
	f.mu.Lock()
	due := now.Sub(f.lastScan) >= warnScanEvery
	if due {
		f.lastScan = now
	}
	f.mu.Unlock()
	if !due {
		return
	}
	f.b.conns.Range(func(_, v any) bool {
		c := v.(*conn)
		c.mu.Lock()
		if c.ev.feed != nil && !c.deleted {
			f.warnLocked(c, now)
		}
		c.mu.Unlock()
		return true
	})
}

// emitLocked numbers ev, fills in c's name and view, keeps it in the ring
// and queues it for every watcher that selects c. c.mu must be held.
func (f *feed) emitLocked(c *conn, ev Event) {
	ev.Name, ev.FeedID, ev.Time = c.name, f.id, f.b.now()
	ev.View = f.b.viewLocked(c)
	f.mu.Lock()
	defer f.mu.Unlock()
	f.seq++
	ev.Seq = f.seq
	f.ring[(f.seq-1)%int64(len(f.ring))] = ev
	f.held = min(f.held+1, len(f.ring))
	c.ev.lastSeq = ev.Seq
	for w := range f.subs {
		if w.behind || !w.match(ev.Name) {
			continue
		}
		if !w.push(ev) {
			// Full: the watcher is too far behind to be caught up event by
			// event; it resyncs from the current state.
			w.behind = true
			close(w.lagged)
		}
	}
}

// subscribe adds a watcher selecting match. When after (of feed id) can
// be resumed, it also returns the held events after it that match, and
// resumed is true.
func (f *feed) subscribe(match func(string) bool, after int64, id string) (w *watcher, replay []Event, resumed bool) {
	f.mu.Lock()
	defer f.mu.Unlock()
	w = &watcher{match: match, from: f.seq, limit: min(len(f.ring), maxWatchBacklog), ready: make(chan struct{}, 1), lagged: make(chan struct{})}
	f.subs[w] = struct{}{}
	oldest := f.seq - int64(f.held) + 1
	if after <= 0 || id != f.id || after > f.seq || after < oldest-1 {
		return w, nil, false
	}
	for s := after + 1; s <= f.seq; s++ {
		if ev := f.ring[(s-1)%int64(len(f.ring))]; match(ev.Name) {
			replay = append(replay, ev)
		}
	}
	return w, replay, true
}

func (f *feed) unsubscribe(w *watcher) {
	f.mu.Lock()
	defer f.mu.Unlock()
	delete(f.subs, w)
}

// WatchConnections sends the selected connections' current state (one
// EventExisting each, by name, then EventSynced), or with req.AfterSeq
// the events missed since (then EventSynced), then one event per change
// until ctx ends, send fails, or the broker closes or ends watches
// ([ErrClosed]). It waits for [Broker.Load] to finish first, so the
// current state is complete.
//
// Emitting never waits for a watcher: a watcher whose backlog is full
// gets the current state again with Resync set, as does one whose
// AfterSeq is no longer held.
func (b *Broker) WatchConnections(ctx context.Context, req WatchRequest, send func(*Event) error) error {
	if err := b.waitLoaded(ctx); err != nil {
		return err
	}
	f := b.events
	w, replay, resumed := f.subscribe(req.match, req.AfterSeq, req.FeedID)
	defer func() { f.unsubscribe(w) }()
	var skip map[string]int64
	var err error
	if resumed {
		err = b.sendReplay(w, replay, send)
	} else {
		skip, err = b.sendCurrent(w, req, req.AfterSeq != 0, send)
	}
	for err == nil {
		select {
		case <-w.lagged:
			// Behind: what is queued is stale, the current state is not.
			f.unsubscribe(w)
			w, _, _ = f.subscribe(req.match, 0, "")
			skip, err = b.sendCurrent(w, req, true, send)
		default:
			err = b.sendNext(ctx, w, skip, send)
		}
	}
	return err
}

// waitLoaded waits until Load is done, ctx ends or watches end.
func (b *Broker) waitLoaded(ctx context.Context) error {
	select {
	case <-b.events.loaded:
		return nil
	case <-ctx.Done():
		return ctx.Err()
	case <-b.stop:
	case <-b.events.ending:
	}
	return ErrClosed
}

// sendNext waits for w's next event and sends it, unless the state the
// watcher was sent already showed it (skip). It returns nil without
// sending when w fell behind meanwhile.
func (b *Broker) sendNext(ctx context.Context, w *watcher, skip map[string]int64, send func(*Event) error) error {
	select {
	case <-ctx.Done():
		return ctx.Err()
	case <-b.stop:
		return ErrClosed
	case <-b.events.ending:
		return ErrClosed
	case <-w.lagged:
		return nil
	case <-w.ready:
		if ev, ok := w.pop(); ok && ev.Seq > skip[ev.Name] {
			return send(&ev)
		}
		return nil
	}
}

// sendReplay sends the events a resuming watcher missed, then
// EventSynced.
func (b *Broker) sendReplay(w *watcher, replay []Event, send func(*Event) error) error {
	for i := range replay {
		if err := send(&replay[i]); err != nil {
			return err
		}
	}
	return send(&Event{Type: EventSynced, Seq: w.from, FeedID: b.events.id, Time: b.now()})
}

// sendCurrent sends every selected connection's state as of w.from, then
// EventSynced. A connection whose state already shows a later event is
// listed in skip with that event's sequence, so the watcher does not see
// it twice.
func (b *Broker) sendCurrent(w *watcher, req WatchRequest, resync bool, send func(*Event) error) (skip map[string]int64, err error) {
	var conns []*conn
	b.conns.Range(func(k, v any) bool {
		if req.match(k.(string)) {
			conns = append(conns, v.(*conn))
		}
		return true
	})
	slices.SortFunc(conns, func(a, c *conn) int { return strings.Compare(a.name, c.name) })
	skip = map[string]int64{}
	id := b.events.id
	for _, c := range conns {
		c.mu.Lock()
		if c.deleted {
			c.mu.Unlock()
			continue
		}
		v, last := b.viewLocked(c), c.ev.lastSeq
		c.mu.Unlock()
		if last > w.from {
			skip[c.name] = last
		}
		if err := send(&Event{Type: EventExisting, Seq: w.from, FeedID: id, Time: b.now(), Name: c.name, View: v, Resync: resync}); err != nil {
			return nil, err
		}
	}
	return skip, send(&Event{Type: EventSynced, Seq: w.from, FeedID: id, Time: b.now(), Resync: resync})
}

// warnSet is a set of warnings, one bit each.
type warnSet uint8

const (
	warnSecret warnSet = 1 << iota
	warnChain
	warnIdle
	warnLoginLimit
)

func (w warnSet) code() string {
	switch w {
	case warnSecret:
		return WarningClientSecretExpiring
	case warnChain:
		return WarningChainEnding
	case warnIdle:
		return WarningIdleLapsing
	}
	return WarningLoginLimit
}

// warningsLocked is the set of warnings that hold for c at now. The
// refresh token ones hold only once the broker's own renewal is overdue:
// the chain within a quarter of the margin it renews at, the idle window
// within min(3 days, a quarter of the sliding lifetime).
func (f *feed) warningsLocked(c *conn, now time.Time) warnSet {
	var set warnSet
	if exp := c.cfg.ClientSecretExpireTime; !exp.IsZero() && exp.Sub(now) <= secretWarnWithin {
		set |= warnSecret
	}
	idle, abs := f.b.lapseTimesLocked(c)
	if !abs.IsZero() && abs.Sub(now) <= chainMargin(c.cfg.AbsoluteLifetime)/4 {
		set |= warnChain
	}
	if !idle.IsZero() && idle.Sub(now) <= min(idleWarnWithin, f.b.sliding(c.cfg)/4) {
		set |= warnIdle
	}
	if c.rt.degraded == ReasonLoginLimit {
		set |= warnLoginLimit
	}
	return set
}

// warningText is what an operator reads for warning w of c.
func (f *feed) warningText(c *conn, w warnSet, now time.Time) string {
	idle, abs := f.b.lapseTimesLocked(c)
	switch w {
	case warnSecret:
		return fmt.Sprintf("client secret expires on %s: add a new shared secret in the Connected Application and update client_secret", c.cfg.ClientSecretExpireTime.UTC().Format(time.DateOnly))
	case warnChain:
		return fmt.Sprintf("the refresh token chain reaches its absolute lifetime in %v and has not been renewed: check status.last_error", abs.Sub(now).Round(time.Minute))
	case warnIdle:
		return fmt.Sprintf("the refresh token lapses unused in %v and has not been kept alive: check status.last_error", idle.Sub(now).Round(time.Minute))
	}
	return "upstream answered API Login Limit: the integration user's concurrent sign-ins are used up; raise the limit or sign other sessions out"
}

// eventWarningsLocked lists the warnings of c that read APIs show beside
// warningsLocked's own (which already covers the client secret).
func (b *Broker) eventWarningsLocked(c *conn) []string {
	now := b.now()
	set := b.events.warningsLocked(c, now)
	var out []string
	for _, w := range []warnSet{warnChain, warnIdle, warnLoginLimit} {
		if set&w != 0 {
			out = append(out, b.events.warningText(c, w, now))
		}
	}
	return out
}

// loaded is the second result of sync.Map's LoadOrStore.
func loaded(_ any, ok bool) bool { return ok }
