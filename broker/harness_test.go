package broker_test

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"log/slog"
	"net/http/httptest"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"

	"tokenbroker/broker"
	"tokenbroker/broker/acumaticatest"
	"tokenbroker/storage"
	"tokenbroker/storage/bolt"
)

var _ broker.Store = (*bolt.Store)(nil)

// runLogs collects every log line the broker writes in this test run;
// TestMain scans them for every secret and every token issued.
var (
	runLogs   = &lockedBuffer{}
	runIdPsMu sync.Mutex
	runIdPs   []*acumaticatest.Server
)

type lockedBuffer struct {
	mu sync.Mutex
	b  bytes.Buffer
}

func (l *lockedBuffer) Write(p []byte) (int, error) {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.b.Write(p)
}

func TestMain(m *testing.M) {
	code := m.Run()
	runLogs.mu.Lock()
	logs := runLogs.b.String()
	runLogs.mu.Unlock()
	secrets := []string{clientSecret, password, "changed-by-someone", "second-secret-value", "not-the-new-one"}
	runIdPsMu.Lock()
	for _, s := range runIdPs {
		secrets = append(secrets, s.Issued()...)
	}
	runIdPsMu.Unlock()
	for _, sec := range secrets {
		if strings.Contains(logs, sec) {
			fmt.Fprintf(os.Stderr, "FAIL: secret %.8s... found in the broker's logs of this test run\n", sec)
			code = 1
		}
	}
	if len(runIdPs) > 0 && !strings.Contains(logs, `"connection"`) {
		fmt.Fprintln(os.Stderr, "FAIL: log scan saw no broker logs; the scan would prove nothing")
		code = 1
	}
	os.Exit(code)
}

// clock is a settable clock shared by the broker and the stand-in.
type clock struct {
	mu sync.Mutex
	t  time.Time
}

func newClock() *clock { return &clock{t: time.Date(2026, 11, 24, 9, 0, 0, 0, time.UTC)} }

func (c *clock) Now() time.Time {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.t
}

func (c *clock) Advance(d time.Duration) {
	c.mu.Lock()
	defer c.mu.Unlock()
	c.t = c.t.Add(d)
}

const (
	clientID     = "88358B02-A48D-A50E-F710-39C1636C30F6@MyTenant"
	clientSecret = "s3cret-CLIENT-value-0123456789"
	username     = "integration"
	password     = "p@ssw0rd-USER-value-9876543210"
	connName     = "tenants/acme/connections/erp"
)

// faultStore wraps a Store and fails writes on demand.
type faultStore struct {
	broker.Store
	mu       sync.Mutex
	failPuts int // fail this many PutTokens calls; -1 fails all
	puts     int
}

var errDiskFull = errors.New("write /data/tokenbroker.db: no space left on device")

func (f *faultStore) PutTokens(ctx context.Context, name string, t *storage.Tokens) error {
	f.mu.Lock()
	f.puts++
	fail := f.failPuts != 0
	if f.failPuts > 0 {
		f.failPuts--
	}
	f.mu.Unlock()
	if fail {
		return errDiskFull
	}
	return f.Store.PutTokens(ctx, name, t)
}

func (f *faultStore) setFail(n int) {
	f.mu.Lock()
	defer f.mu.Unlock()
	f.failPuts = n
}

type env struct {
	t     *testing.T
	clock *clock
	idp   *acumaticatest.Server
	http  *httptest.Server
	dir   string
	keys  *storage.Keyring
	store *bolt.Store
	fs    *faultStore
	b     *broker.Broker
	opts  broker.Options
}

type envOption func(*acumaticatest.Options, *broker.Options)

func newEnv(t *testing.T, opts ...envOption) *env {
	t.Helper()
	e := &env{t: t, clock: newClock(), dir: t.TempDir()}
	idpOpts := acumaticatest.Options{Now: e.clock.Now}
	bOpts := broker.Options{
		Logger:       slog.New(slog.NewJSONHandler(runLogs, &slog.HandlerOptions{Level: slog.LevelDebug})),
		Now:          e.clock.Now,
		TickInterval: -1,
		BackoffBase:  time.Millisecond,
		BackoffMax:   10 * time.Millisecond,
		Sleep:        func(context.Context, time.Duration) error { return nil },
	}
	for _, o := range opts {
		o(&idpOpts, &bOpts)
	}
	e.idp = acumaticatest.New(idpOpts)
	runIdPsMu.Lock()
	runIdPs = append(runIdPs, e.idp)
	runIdPsMu.Unlock()
	e.idp.AddClient(clientID, clientSecret)
	e.idp.AddUser(username, password)
	e.http = e.idp.Start()
	t.Cleanup(e.http.Close)
	keys, err := storage.NewKeyring(make([]byte, 32))
	if err != nil {
		t.Fatal(err)
	}
	e.keys = keys
	e.opts = bOpts
	e.open()
	return e
}

// open opens the store and a broker over it, loading stored connections.
func (e *env) open() {
	e.t.Helper()
	st, err := bolt.Open(filepath.Join(e.dir, "tokenbroker.db"), bolt.Options{Keyring: e.keys, Now: e.clock.Now})
	if err != nil {
		e.t.Fatal(err)
	}
	e.store = st
	e.fs = &faultStore{Store: st}
	e.b = e.newBroker()
	e.t.Cleanup(e.close)
}

// newBroker starts a broker over the open store and loads it.
func (e *env) newBroker() *broker.Broker {
	e.t.Helper()
	o := e.opts
	o.Store = e.fs
	b, err := broker.New(o)
	if err != nil {
		e.t.Fatal(err)
	}
	if _, err := b.Load(context.Background()); err != nil {
		e.t.Fatal(err)
	}
	return b
}

func (e *env) close() {
	if e.b != nil {
		e.b.Close()
		e.b = nil
	}
	if e.store != nil {
		e.store.Close()
		e.store = nil
	}
}

// settle waits for the broker's shared refreshes by closing it, then starts
// a new broker over the same open store.
func (e *env) settle() {
	e.t.Helper()
	e.b.Close()
	e.b = e.newBroker()
}

// restart closes the broker and store and opens them again from disk.
func (e *env) restart() {
	e.close()
	e.open()
}

func (e *env) conn() *storage.Connection {
	return &storage.Connection{
		Name:         connName,
		InstanceURL:  e.http.URL,
		ClientID:     clientID,
		ClientSecret: clientSecret,
		Username:     username,
		Password:     password,
	}
}

func (e *env) create() *broker.View {
	e.t.Helper()
	v, err := e.b.CreateConnection(context.Background(), e.conn(), false)
	if err != nil {
		e.t.Fatalf("CreateConnection: %v", err)
	}
	return v
}

func (e *env) token(min time.Duration) (broker.Token, error) {
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	return e.b.GetAccessToken(ctx, connName, min, "")
}

func (e *env) mustToken() broker.Token {
	e.t.Helper()
	tok, err := e.token(time.Minute)
	if err != nil {
		e.t.Fatalf("GetAccessToken: %v", err)
	}
	return tok
}

func (e *env) stored() *storage.Tokens {
	e.t.Helper()
	tok, err := e.store.GetTokens(context.Background(), connName)
	if err != nil {
		e.t.Fatal(err)
	}
	return tok
}

func (e *env) view() *broker.View {
	e.t.Helper()
	v, err := e.b.GetConnection(context.Background(), connName)
	if err != nil {
		e.t.Fatal(err)
	}
	return v
}
