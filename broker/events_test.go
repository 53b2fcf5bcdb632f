package broker_test

import (
	"context"
	"fmt"
	"strings"
	"testing"
	"time"

	"tokenbroker/broker"
	"tokenbroker/broker/acumaticatest"
	"tokenbroker/internal/testkit"
	"tokenbroker/storage"
	"tokenbroker/storage/etcdtest"
)

// eventLog runs WatchConnections on b and collects what it sends. With
// hold set, each send waits until the test reads it: a consumer that
// reads slowly.
type eventLog struct {
	t    *testing.T
	ch   chan broker.Event
	done chan error
}

func watchEvents(t *testing.T, b *broker.Broker, req broker.WatchRequest, backlog int) *eventLog {
	t.Helper()
	ctx, cancel := context.WithCancel(context.Background())
	l := &eventLog{t: t, ch: make(chan broker.Event, backlog), done: make(chan error, 1)}
	go func() {
		l.done <- b.WatchConnections(ctx, req, func(ev *broker.Event) error {
			select {
			case l.ch <- *ev:
				return nil
			case <-ctx.Done():
				return ctx.Err()
			}
		})
	}()
	t.Cleanup(func() {
		cancel()
		<-l.done
	})
	return l
}

func (l *eventLog) next() broker.Event {
	l.t.Helper()
	select {
	case ev := <-l.ch:
		return ev
	case err := <-l.done:
		l.t.Fatalf("watch ended: %v", err)
	case <-time.After(10 * time.Second):
		l.t.Fatal("no event within 10 s")
	}
	return broker.Event{}
}

// brief is an event as tests compare it.
func brief(ev broker.Event) string {
	s := fmt.Sprintf("%s %s", eventName[ev.Type], ev.Name)
	if ev.View != nil {
		s += " " + string(ev.View.State)
	}
	if ev.WarningCode != "" {
		s += " " + ev.WarningCode
	}
	if ev.Resync {
		s += " resync"
	}
	return s
}

var eventName = map[broker.EventType]string{
	broker.EventExisting: "existing", broker.EventSynced: "synced", broker.EventCreated: "created",
	broker.EventUpdated: "updated", broker.EventDeleted: "deleted", broker.EventStateChanged: "state",
	broker.EventWarning: "warning",
}

// rename changes the connection's display name: one updated event.
func rename(t *testing.T, b *broker.Broker, name, to string) {
	t.Helper()
	if _, err := b.UpdateConnection(context.Background(), name, &storage.Connection{DisplayName: to}, []string{"display_name"}, "", false); err != nil {
		t.Fatal(err)
	}
}

// TestSlowWatcherResyncsAndNeverBlocksTheBroker: a watcher that does not
// read while 40 changes happen holds up none of them (the feed keeps at
// most its backlog for it); when it reads again it is told to resync and
// gets the current state, then live changes.
func TestSlowWatcherResyncsAndNeverBlocksTheBroker(t *testing.T) {
	e := newEnv(t, func(_ *acumaticatest.Options, o *broker.Options) { o.EventRing = 8 })
	e.create()
	l := watchEvents(t, e.b, broker.WatchRequest{}, 0) // unbuffered: nothing is read until the test reads
	if got := brief(l.next()); got != "existing "+connName+" ACTIVE" {
		t.Fatalf("first event %q", got)
	}
	if got := brief(l.next()); got != "synced " {
		t.Fatalf("second event %q", got)
	}
	done := make(chan struct{})
	go func() {
		defer close(done)
		for i := range 40 {
			rename(t, e.b, connName, fmt.Sprintf("name %d", i))
		}
	}()
	select {
	case <-done:
	case <-time.After(20 * time.Second):
		t.Fatal("changes waited for a watcher that does not read")
	}
	first := l.next() // the one its send was holding
	if brief(first) != "updated "+connName+" ACTIVE" || first.View.Conn.DisplayName != "name 0" {
		t.Fatalf("held event %q %q", brief(first), first.View.Conn.DisplayName)
	}
	ex := l.next()
	if brief(ex) != "existing "+connName+" ACTIVE resync" || ex.View.Conn.DisplayName != "name 39" {
		t.Fatalf("after falling behind: %q %q, want the current state with resync", brief(ex), ex.View.Conn.DisplayName)
	}
	if got := l.next(); brief(got) != "synced  resync" || got.Seq != ex.Seq {
		t.Fatalf("resync end %q seq %d", brief(got), got.Seq)
	}
	rename(t, e.b, connName, "live")
	if got := l.next(); brief(got) != "updated "+connName+" ACTIVE" || got.View.Conn.DisplayName != "live" || got.Seq != ex.Seq+1 {
		t.Fatalf("live after resync: %q %q seq %d", brief(got), got.View.Conn.DisplayName, got.Seq)
	}
}

// TestResumeBeyondTheRingResyncs: events the ring no longer holds cannot
// be replayed; the watcher resyncs instead. Within the ring it resumes.
func TestResumeBeyondTheRingResyncs(t *testing.T) {
	e := newEnv(t, func(_ *acumaticatest.Options, o *broker.Options) { o.EventRing = 8 })
	e.create()
	l := watchEvents(t, e.b, broker.WatchRequest{}, 100)
	l.next()
	synced := l.next()
	for i := range 5 {
		rename(t, e.b, connName, fmt.Sprintf("name %d", i))
	}
	within := watchEvents(t, e.b, broker.WatchRequest{AfterSeq: synced.Seq, FeedID: synced.FeedID}, 100)
	for i := range 5 {
		if ev := within.next(); ev.Type != broker.EventUpdated || ev.View.Conn.DisplayName != fmt.Sprintf("name %d", i) || ev.Seq != synced.Seq+int64(i)+1 {
			t.Fatalf("replayed %d: %q %q seq %d", i, brief(ev), ev.View.Conn.DisplayName, ev.Seq)
		}
	}
	if ev := within.next(); ev.Type != broker.EventSynced || ev.Resync {
		t.Fatalf("after replay %q", brief(ev))
	}
	for i := range 10 {
		rename(t, e.b, connName, fmt.Sprintf("more %d", i))
	}
	beyond := watchEvents(t, e.b, broker.WatchRequest{AfterSeq: synced.Seq, FeedID: synced.FeedID}, 100)
	if ev := beyond.next(); brief(ev) != "existing "+connName+" ACTIVE resync" || ev.View.Conn.DisplayName != "more 9" {
		t.Fatalf("resume beyond the ring: %q", brief(ev))
	}
}

// TestResumeWithoutFeedIDResyncs: a sequence without the feed it came
// from may be another replica's, so it is not replayed from this feed:
// the watcher gets the current state with resync set.
func TestResumeWithoutFeedIDResyncs(t *testing.T) {
	e := newEnv(t)
	e.create()
	l := watchEvents(t, e.b, broker.WatchRequest{}, 100)
	l.next()
	synced := l.next()
	rename(t, e.b, connName, "after")
	w := watchEvents(t, e.b, broker.WatchRequest{AfterSeq: synced.Seq}, 100)
	if ev := w.next(); brief(ev) != "existing "+connName+" ACTIVE resync" || ev.View.Conn.DisplayName != "after" {
		t.Fatalf("resume without a feed id: %q, want the current state with resync", brief(ev))
	}
	if ev := w.next(); ev.Type != broker.EventSynced || !ev.Resync {
		t.Fatalf("resync end %q", brief(ev))
	}
}

// TestWarningEventsAppearOnce: a client secret entering its last 30 days
// and an API Login Limit answer each give one warning event, and the
// login limit shows in the connection's warnings.
func TestWarningEventsAppearOnce(t *testing.T) {
	e := newEnv(t)
	e.create()
	l := watchEvents(t, e.b, broker.WatchRequest{}, 100)
	l.next()
	l.next()
	exp := e.clock.Now().Add(40 * 24 * time.Hour)
	if _, err := e.b.UpdateConnection(context.Background(), connName, &storage.Connection{ClientSecretExpireTime: exp}, []string{"client_secret_expire_time"}, "", false); err != nil {
		t.Fatal(err)
	}
	if got := brief(l.next()); got != "updated "+connName+" ACTIVE" {
		t.Fatalf("%q", got)
	}
	e.b.Maintain()
	e.clock.Advance(11 * 24 * time.Hour) // 29 days left; the idle refresh token is kept alive too
	e.b.Maintain()
	e.b.Settle()
	e.b.Maintain() // a second look finds nothing new
	e.b.Settle()
	if got := brief(l.next()); got != "warning "+connName+" ACTIVE CLIENT_SECRET_EXPIRING" {
		t.Fatalf("%q", got)
	}

	e.idp.Inject(acumaticatest.Fault{Status: 429, Body: `{"error":"invalid_grant","error_description":"API Login Limit"}`})
	e.clock.Advance(2 * time.Hour) // the access token expired
	if _, err := e.token(time.Minute); err == nil {
		t.Fatal("token despite the login limit")
	}
	if got := brief(l.next()); got != "state "+connName+" DEGRADED" {
		t.Fatalf("%q", got)
	}
	ev := l.next()
	if brief(ev) != "warning "+connName+" DEGRADED LOGIN_LIMIT_REACHED" || !strings.Contains(ev.Warning, "Login Limit") {
		t.Fatalf("%q %q", brief(ev), ev.Warning)
	}
	if w := e.view().Status.Warnings; !strings.Contains(strings.Join(w, "|"), "Login Limit") {
		t.Errorf("view warnings %q lack the login limit", w)
	}
	select {
	case ev := <-l.ch:
		t.Errorf("unexpected event %q", brief(ev))
	default:
	}
}

// TestReplicasDeliverEachOthersEventsOnce: on embedded etcd each replica's
// watch shows every change made on either replica exactly once.
func TestReplicasDeliverEachOthersEventsOnce(t *testing.T) {
	clk := testkit.NewClock()
	idp := acumaticatest.New(acumaticatest.Options{Now: clk.Now})
	idp.AddClient(clientID, clientSecret)
	idp.AddUser(username, password)
	hs := idp.Start()
	defer hs.Close()
	endpoint := etcdtest.Start(t)
	a, b := replica(t, endpoint, clk), replica(t, endpoint, clk)
	la := watchEvents(t, a, broker.WatchRequest{}, 100)
	lb := watchEvents(t, b, broker.WatchRequest{}, 100)
	for _, l := range []*eventLog{la, lb} {
		if got := brief(l.next()); got != "synced " {
			t.Fatalf("%q", got)
		}
	}
	ctx := context.Background()
	conn := func(name string) *storage.Connection {
		return &storage.Connection{Name: name, InstanceURL: hs.URL, ClientID: clientID, ClientSecret: clientSecret, Username: username, Password: password}
	}
	if _, err := a.CreateConnection(ctx, conn(connName), false); err != nil {
		t.Fatal(err)
	}
	testkit.Eventually(t, "b to see the connection", func() bool { _, err := b.GetConnection(ctx, connName); return err == nil })
	rename(t, b, connName, "renamed on b")
	testkit.Eventually(t, "a to see the new name", func() bool {
		v, err := a.GetConnection(ctx, connName)
		return err == nil && v.Conn.DisplayName == "renamed on b"
	})
	idp.AddClient(clientID, "rotated-away")
	clk.Advance(2 * time.Hour)
	if _, err := a.GetAccessToken(ctx, connName, time.Minute, ""); err == nil {
		t.Fatal("token with a rejected client")
	}
	testkit.Eventually(t, "b to see NEEDS_REAUTH", func() bool {
		v, err := b.GetConnection(ctx, connName)
		return err == nil && v.State == broker.StateNeedsReauth
	})
	if err := b.DeleteConnection(ctx, connName, ""); err != nil {
		t.Fatal(err)
	}
	const marker = "tenants/acme/connections/marker"
	idp.AddClient(clientID, clientSecret)
	if _, err := b.CreateConnection(ctx, conn(marker), false); err != nil {
		t.Fatal(err)
	}
	// The last change comes from a once a has the marker, and is awaited on
	// b: each replica's watch of the store delivers in revision order, so by
	// then every echo of an earlier change has been seen on both.
	testkit.Eventually(t, "a to see the marker", func() bool { _, err := a.GetConnection(ctx, marker); return err == nil })
	rename(t, a, marker, "last")
	testkit.Eventually(t, "b to see the marker renamed", func() bool {
		v, err := b.GetConnection(ctx, marker)
		return err == nil && v.Conn.DisplayName == "last"
	})
	want := []string{
		"created " + connName + " ACTIVE",
		"updated " + connName + " ACTIVE",
		"state " + connName + " NEEDS_REAUTH",
		"deleted " + connName + " NEEDS_REAUTH",
		"created " + marker + " ACTIVE",
		"updated " + marker + " ACTIVE",
	}
	for name, l := range map[string]*eventLog{"a": la, "b": lb} {
		for i, w := range want {
			if got := brief(l.next()); got != w {
				t.Errorf("replica %s event %d = %q, want %q", name, i, got, w)
			}
		}
		select {
		case ev := <-l.ch:
			t.Errorf("replica %s sent more: %q", name, brief(ev))
		default:
		}
	}
}
