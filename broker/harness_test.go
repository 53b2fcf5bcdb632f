package broker_test

import (
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
	"tokenbroker/internal/testkit"
	"tokenbroker/storage"
	"tokenbroker/storage/bolt"
)

var _ broker.Store = (*bolt.Store)(nil)

// runLogs collects every log line the broker writes in this test run;
// TestMain scans them for every secret and every token issued.
var (
	runLogs   = &testkit.LockedBuffer{}
	runIDPsMu sync.Mutex
	runIDPs   []*acumaticatest.Server
)

func TestMain(m *testing.M) {
	code := m.Run()
	logs := runLogs.String()
	secrets := []string{clientSecret, password, "changed-by-someone", "second-secret-value", "not-the-new-one"}
	runIDPsMu.Lock()
	for _, s := range runIDPs {
		secrets = append(secrets, s.Issued()...)
	}
	runIDPsMu.Unlock()
	for _, sec := range secrets {
		if strings.Contains(logs, sec) {
			fmt.Fprintf(os.Stderr, "FAIL: secret %.8s... found in the broker's logs of this test run\n", sec)
			code = 1
		}
	}
	if len(runIDPs) > 0 && !strings.Contains(logs, `"connection"`) {
		fmt.Fprintln(os.Stderr, "FAIL: log scan saw no broker logs; the scan would prove nothing")
		code = 1
	}
	os.Exit(code)
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
	clock *testkit.Clock // shared by the broker and the stand-in
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
	e := &env{t: t, clock: testkit.NewClock(), dir: t.TempDir()}
	idpOpts := acumaticatest.Options{Now: e.clock.Now}
	bOpts := broker.Options{
		// The stand-in serves on loopback.
		AllowInsecureUpstream: true,
		Logger:                slog.New(slog.NewJSONHandler(runLogs, &slog.HandlerOptions{Level: slog.LevelDebug})),
		Now:                   e.clock.Now,
		TickInterval:          -1,
		BackoffBase:           time.Millisecond,
		BackoffMax:            10 * time.Millisecond,
		Sleep:                 func(context.Context, time.Duration) error { return nil },
	}
	for _, o := range opts {
		o(&idpOpts, &bOpts)
	}
	e.idp = acumaticatest.New(idpOpts)
	runIDPsMu.Lock()
	runIDPs = append(runIDPs, e.idp)
	runIDPsMu.Unlock()
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
