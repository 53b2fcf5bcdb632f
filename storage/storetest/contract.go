// Package storetest is the contract every tokenbroker store keeps, as a test
// suite each backend runs against itself, and the sample records the
// backends' own tests share. It is imported only by tests.
package storetest

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"sync"
	"testing"
	"time"

	"github.com/google/go-cmp/cmp"

	"tokenbroker/storage"
)

// Store is what the contract covers: the methods the broker needs of a
// store.
type Store interface {
	CreateConnection(ctx context.Context, c *storage.Connection, t *storage.Tokens) (*storage.Connection, error)
	GetConnection(ctx context.Context, name string) (*storage.Connection, error)
	ListConnections(ctx context.Context, prefix, after string, limit int) ([]*storage.Connection, error)
	UpdateConnection(ctx context.Context, c *storage.Connection, t *storage.Tokens) (*storage.Connection, error)
	DeleteConnection(ctx context.Context, name string, revision int64) error
	MarkDeleting(ctx context.Context, name string, revision int64) error
	GetTokens(ctx context.Context, name string) (*storage.Tokens, error)
	PutTokens(ctx context.Context, name string, t *storage.Tokens) error
	LoadAll(ctx context.Context, fn func(*storage.Connection, *storage.Tokens) error) error
}

// Secrets of the sample records, to look for where they must not be.
const (
	Secret   = "client-SECRET-0123456789abcdef"
	Password = "user-PASSWORD-0123456789abcdef"
	Refresh  = "rt-REFRESH-0123456789abcdef"
	Access   = "at-ACCESS-0123456789abcdef"
)

// Key is a data key made of the byte b.
func Key(b byte) []byte { return bytes.Repeat([]byte{b}, storage.KeySize) }

// Keyring is a keyring over keys; the first one seals.
func Keyring(t testing.TB, keys ...[]byte) *storage.Keyring {
	t.Helper()
	k, err := storage.NewKeyring(keys...)
	if err != nil {
		t.Fatal(err)
	}
	return k
}

// SampleConn is a connection named name holding every kind of field.
func SampleConn(name string) *storage.Connection {
	return &storage.Connection{
		Name: name, DisplayName: "ERP", InstanceURL: "https://erp.example.com", ClientID: "G@T",
		ClientSecret: Secret, Username: "u", Password: Password, Scopes: []string{"api", "offline_access"},
		SlidingLifetime: 15 * 24 * time.Hour, CreateTime: time.Unix(1700000000, 0).UTC(), UpdateTime: time.Unix(1700000000, 0).UTC(),
		Flow: storage.FlowAuthorizationCode, RedirectURI: "https://app.example.com/callback",
	}
}

// SampleTokens is a token chain state holding every kind of field.
func SampleTokens() *storage.Tokens {
	return &storage.Tokens{Generation: 1, RefreshToken: Refresh, AccessToken: Access, TokenType: "Bearer",
		AccessTokenExpireTime: time.Unix(1700003600, 0).UTC(), IssueTime: time.Unix(1700000000, 0).UTC(), State: "ACTIVE"}
}

// rule is one named rule of the contract, checked on a fresh, empty store.
type rule struct {
	name  string
	check func(t *testing.T, s Store)
}

var rules = []rule{
	{"create sets revision 1 and reads back", createReadsBack},
	{"create refuses an existing name", createRefusesExisting},
	{"list filters by prefix, after and limit", listFilters},
	{"update bumps the revision and refuses a stale one", updateRevisions},
	{"update without tokens keeps the tokens", updateKeepsTokens},
	{"update with tokens replaces them", updateReplacesTokens},
	{"put tokens replaces the token state", putTokensReplaces},
	{"delete refuses a stale revision", deleteRefusesStale},
	{"delete erases the connection and its tokens", deleteErases},
	{"tokens never resurrect a deleted connection", putTokensAfterDelete},
	{"missing names are not found", missingNotFound},
	{"load all pairs each connection with its own tokens", loadAllPairs},
	{"mark deleting refuses a stale revision", markDeletingRefusesStale},
	{"mark deleting hides the connection from every read and write", markDeletingHides},
	{"load all reports a delete in progress until it is erased", loadAllReportsDeleting},
}

// Run checks every rule of the contract, each as its own subtest on a store
// from open, which must return a fresh, empty store on every call.
func Run(t *testing.T, open func(t *testing.T) Store) {
	for _, r := range rules {
		t.Run(r.name, func(t *testing.T) { r.check(t, open(t)) })
	}
}

const sample = "tenants/a/connections/x"

// create stores the sample connection with the sample tokens.
func create(t *testing.T, s Store) *storage.Connection {
	t.Helper()
	c, err := s.CreateConnection(context.Background(), SampleConn(sample), SampleTokens())
	if err != nil {
		t.Fatalf("create: %v", err)
	}
	return c
}

func createReadsBack(t *testing.T, s Store) {
	ctx := context.Background()
	c := create(t, s)
	want := SampleConn(sample)
	want.Revision = 1
	if diff := cmp.Diff(c, want); diff != "" {
		t.Errorf("create returned (-got +want):\n%s", diff)
	}
	got, err := s.GetConnection(ctx, sample)
	if err != nil {
		t.Fatal(err)
	}
	if diff := cmp.Diff(got, want); diff != "" {
		t.Errorf("get (-got +want):\n%s", diff)
	}
	tok, err := s.GetTokens(ctx, sample)
	if err != nil {
		t.Fatal(err)
	}
	if diff := cmp.Diff(tok, SampleTokens()); diff != "" {
		t.Errorf("tokens (-got +want):\n%s", diff)
	}
}

func createRefusesExisting(t *testing.T, s Store) {
	create(t, s)
	other := SampleConn(sample)
	other.DisplayName = "other"
	if _, err := s.CreateConnection(context.Background(), other, nil); !errors.Is(err, storage.ErrAlreadyExists) {
		t.Errorf("second create: %v, want ErrAlreadyExists", err)
	}
	if got, err := s.GetConnection(context.Background(), sample); err != nil || got.DisplayName != "ERP" {
		t.Errorf("refused create changed the stored connection: %v %v", got, err)
	}
}

func listFilters(t *testing.T, s Store) {
	ctx := context.Background()
	for _, n := range []string{"tenants/a/connections/x", "tenants/a/connections/y", "tenants/b/connections/x", "tenants/ab/connections/z"} {
		if _, err := s.CreateConnection(ctx, SampleConn(n), nil); err != nil {
			t.Fatal(err)
		}
	}
	for _, tc := range []struct {
		prefix, after string
		limit         int
		want          []string
	}{
		{"tenants/a/connections/", "", 10, []string{"tenants/a/connections/x", "tenants/a/connections/y"}},
		{"tenants/", "", 2, []string{"tenants/a/connections/x", "tenants/a/connections/y"}},
		{"tenants/", "tenants/a/connections/y", 10, []string{"tenants/ab/connections/z", "tenants/b/connections/x"}},
		{"tenants/c/connections/", "", 10, nil},
	} {
		list, err := s.ListConnections(ctx, tc.prefix, tc.after, tc.limit)
		if err != nil {
			t.Fatal(err)
		}
		var names []string
		for _, c := range list {
			names = append(names, c.Name)
		}
		if diff := cmp.Diff(names, tc.want); diff != "" {
			t.Errorf("list %q after %q limit %d (-got +want):\n%s", tc.prefix, tc.after, tc.limit, diff)
		}
	}
}

func updateRevisions(t *testing.T, s Store) {
	ctx := context.Background()
	upd := create(t, s).Clone()
	upd.DisplayName = "new"
	u, err := s.UpdateConnection(ctx, upd, nil)
	if err != nil || u.Revision != 2 {
		t.Fatalf("update: %v %v", u, err)
	}
	if got, err := s.GetConnection(ctx, sample); err != nil || got.DisplayName != "new" || got.Revision != 2 {
		t.Errorf("after update: %+v %v", got, err)
	}
	stale := upd.Clone()
	stale.DisplayName = "stale"
	if _, err := s.UpdateConnection(ctx, stale, nil); !errors.Is(err, storage.ErrConflict) {
		t.Errorf("stale update: %v, want ErrConflict", err)
	}
	if got, err := s.GetConnection(ctx, sample); err != nil || got.DisplayName != "new" {
		t.Errorf("refused update changed the connection: %+v %v", got, err)
	}
}

func updateKeepsTokens(t *testing.T, s Store) {
	ctx := context.Background()
	upd := create(t, s).Clone()
	upd.DisplayName = "new"
	if _, err := s.UpdateConnection(ctx, upd, nil); err != nil {
		t.Fatal(err)
	}
	if tok, err := s.GetTokens(ctx, sample); err != nil || tok.RefreshToken != Refresh {
		t.Errorf("update without tokens changed tokens: %v", err)
	}
}

func updateReplacesTokens(t *testing.T, s Store) {
	ctx := context.Background()
	upd := create(t, s).Clone()
	next := SampleTokens()
	next.Generation, next.RefreshToken = 2, "rt-next"
	if _, err := s.UpdateConnection(ctx, upd, next); err != nil {
		t.Fatal(err)
	}
	if tok, err := s.GetTokens(ctx, sample); err != nil || tok.Generation != 2 || tok.RefreshToken != "rt-next" {
		t.Errorf("tokens after update with tokens: %+v %v", tok, err)
	}
}

func putTokensReplaces(t *testing.T, s Store) {
	ctx := context.Background()
	create(t, s)
	next := SampleTokens()
	next.Generation, next.AccessToken, next.IntentGrant = 7, "at-next", "refresh_token"
	if err := s.PutTokens(ctx, sample, next); err != nil {
		t.Fatal(err)
	}
	got, err := s.GetTokens(ctx, sample)
	if err != nil {
		t.Fatal(err)
	}
	if diff := cmp.Diff(got, next); diff != "" {
		t.Errorf("tokens after put (-got +want):\n%s", diff)
	}
	if c, err := s.GetConnection(ctx, sample); err != nil || c.Revision != 1 {
		t.Errorf("put tokens changed the connection's revision: %v %v", c, err)
	}
}

func deleteRefusesStale(t *testing.T, s Store) {
	ctx := context.Background()
	upd := create(t, s).Clone()
	if _, err := s.UpdateConnection(ctx, upd, nil); err != nil {
		t.Fatal(err)
	}
	if err := s.DeleteConnection(ctx, sample, 1); !errors.Is(err, storage.ErrConflict) {
		t.Errorf("delete at stale revision: %v, want ErrConflict", err)
	}
	if _, err := s.GetConnection(ctx, sample); err != nil {
		t.Errorf("refused delete erased the connection: %v", err)
	}
}

func deleteErases(t *testing.T, s Store) {
	ctx := context.Background()
	create(t, s)
	if err := s.DeleteConnection(ctx, sample, 1); err != nil {
		t.Fatal(err)
	}
	if _, err := s.GetConnection(ctx, sample); !errors.Is(err, storage.ErrNotFound) {
		t.Errorf("connection after delete: %v, want ErrNotFound", err)
	}
	if _, err := s.GetTokens(ctx, sample); !errors.Is(err, storage.ErrNotFound) {
		t.Errorf("tokens after delete: %v, want ErrNotFound", err)
	}
	// Revision 0 deletes whatever revision is stored.
	if _, err := s.CreateConnection(ctx, SampleConn(sample), nil); err != nil {
		t.Fatalf("create again after delete: %v", err)
	}
	if err := s.DeleteConnection(ctx, sample, 0); err != nil {
		t.Errorf("delete at revision 0: %v", err)
	}
}

func putTokensAfterDelete(t *testing.T, s Store) {
	ctx := context.Background()
	create(t, s)
	if err := s.DeleteConnection(ctx, sample, 1); err != nil {
		t.Fatal(err)
	}
	if err := s.PutTokens(ctx, sample, SampleTokens()); !errors.Is(err, storage.ErrNotFound) {
		t.Errorf("PutTokens on deleted connection: %v, want ErrNotFound", err)
	}
	if _, err := s.GetTokens(ctx, sample); !errors.Is(err, storage.ErrNotFound) {
		t.Errorf("tokens of the deleted connection: %v, want ErrNotFound", err)
	}
}

func missingNotFound(t *testing.T, s Store) {
	ctx := context.Background()
	const missing = "tenants/a/connections/missing"
	if _, err := s.GetConnection(ctx, missing); !errors.Is(err, storage.ErrNotFound) {
		t.Errorf("get: %v", err)
	}
	if _, err := s.GetTokens(ctx, missing); !errors.Is(err, storage.ErrNotFound) {
		t.Errorf("get tokens: %v", err)
	}
	if _, err := s.UpdateConnection(ctx, SampleConn(missing), nil); !errors.Is(err, storage.ErrNotFound) {
		t.Errorf("update: %v", err)
	}
	if err := s.DeleteConnection(ctx, missing, 0); !errors.Is(err, storage.ErrNotFound) {
		t.Errorf("delete: %v", err)
	}
}

// LoadAllCount is how many connections the load rule stores: more than
// two of the etcd store's 200-key pages.
const LoadAllCount = 450

// WithTokens reports whether the load rule stores tokens for connection i.
func WithTokens(i int) bool { return i%7 != 3 }

// LoadName is the name of the load rule's connection i.
func LoadName(i int) string { return fmt.Sprintf("tenants/t%03d/connections/erp", i) }

// CreateForLoad stores the load rule's connections: LoadAllCount of them,
// most with a token state of their own (generation i+1), some with none.
func CreateForLoad(t testing.TB, s Store) {
	t.Helper()
	ctx := context.Background()
	for i := range LoadAllCount {
		var tok *storage.Tokens
		if WithTokens(i) {
			tok = SampleTokens()
			tok.RefreshToken = "rt-" + LoadName(i)
			tok.Generation = int64(i + 1)
		}
		if _, err := s.CreateConnection(ctx, SampleConn(LoadName(i)), tok); err != nil {
			t.Fatal(err)
		}
	}
}

// CheckLoadAll loads everything CreateForLoad stored and checks that each
// connection came once, with its secrets and its own token state (or none).
func CheckLoadAll(t testing.TB, s Store) {
	t.Helper()
	seen := map[string]bool{}
	var mu sync.Mutex
	err := s.LoadAll(context.Background(), func(c *storage.Connection, tok *storage.Tokens) error {
		var i int
		if _, err := fmt.Sscanf(c.Name, "tenants/t%03d/connections/erp", &i); err != nil {
			return err
		}
		switch {
		case c.Password != Password || c.ClientSecret != Secret:
			t.Errorf("%s loaded without its secrets", c.Name)
		case WithTokens(i) && (tok.RefreshToken != "rt-"+c.Name || tok.Generation != int64(i+1)):
			t.Errorf("%s loaded with tokens of generation %d", c.Name, tok.Generation)
		case !WithTokens(i) && (tok.RefreshToken != "" || tok.Generation != 0):
			t.Errorf("%s has no tokens but loaded generation %d", c.Name, tok.Generation)
		}
		mu.Lock()
		defer mu.Unlock()
		if seen[c.Name] {
			t.Errorf("%s loaded twice", c.Name)
		}
		seen[c.Name] = true
		return nil
	})
	if err != nil || len(seen) != LoadAllCount {
		t.Fatalf("LoadAll: %d of %d connections, %v", len(seen), LoadAllCount, err)
	}
}

func loadAllPairs(t *testing.T, s Store) {
	CreateForLoad(t, s)
	CheckLoadAll(t, s)
}

func markDeletingRefusesStale(t *testing.T, s Store) {
	ctx := context.Background()
	create(t, s)
	if err := s.MarkDeleting(ctx, sample, 2); !errors.Is(err, storage.ErrConflict) {
		t.Errorf("mark deleting at a stale revision: %v, want ErrConflict", err)
	}
	if _, err := s.GetConnection(ctx, sample); err != nil {
		t.Errorf("refused mark hid the connection: %v", err)
	}
	if err := s.MarkDeleting(ctx, "tenants/a/connections/missing", 0); !errors.Is(err, storage.ErrNotFound) {
		t.Errorf("mark deleting a missing name: %v, want ErrNotFound", err)
	}
}

func markDeletingHides(t *testing.T, s Store) {
	ctx := context.Background()
	c := create(t, s)
	if err := s.MarkDeleting(ctx, sample, 1); err != nil {
		t.Fatal(err)
	}
	if _, err := s.GetConnection(ctx, sample); !errors.Is(err, storage.ErrNotFound) {
		t.Errorf("get: %v, want ErrNotFound", err)
	}
	if _, err := s.GetTokens(ctx, sample); !errors.Is(err, storage.ErrNotFound) {
		t.Errorf("get tokens: %v, want ErrNotFound", err)
	}
	if list, err := s.ListConnections(ctx, "tenants/", "", 10); err != nil || len(list) != 0 {
		t.Errorf("list: %d connections, %v; want none", len(list), err)
	}
	if err := s.PutTokens(ctx, sample, SampleTokens()); !errors.Is(err, storage.ErrNotFound) {
		t.Errorf("put tokens: %v, want ErrNotFound", err)
	}
	if _, err := s.UpdateConnection(ctx, c, nil); !errors.Is(err, storage.ErrNotFound) {
		t.Errorf("update: %v, want ErrNotFound", err)
	}
	if err := s.MarkDeleting(ctx, sample, 0); !errors.Is(err, storage.ErrNotFound) {
		t.Errorf("mark again: %v, want ErrNotFound", err)
	}
	if _, err := s.CreateConnection(ctx, SampleConn(sample), nil); !errors.Is(err, storage.ErrAlreadyExists) {
		t.Errorf("create while the delete is unfinished: %v, want ErrAlreadyExists", err)
	}
}

func loadAllReportsDeleting(t *testing.T, s Store) {
	ctx := context.Background()
	create(t, s)
	if _, err := s.CreateConnection(ctx, SampleConn("tenants/b/connections/y"), SampleTokens()); err != nil {
		t.Fatal(err)
	}
	if err := s.MarkDeleting(ctx, sample, 0); err != nil {
		t.Fatal(err)
	}
	got := map[string]*storage.Tokens{}
	var deleting *storage.Connection
	var mu sync.Mutex
	err := s.LoadAll(ctx, func(c *storage.Connection, tk *storage.Tokens) error {
		mu.Lock()
		defer mu.Unlock()
		got[c.Name] = tk
		if !c.DeleteTime.IsZero() {
			deleting = c
		}
		return nil
	})
	if err != nil {
		t.Fatal(err)
	}
	if len(got) != 2 || deleting == nil || deleting.Name != sample {
		t.Fatalf("load all: %d records, delete in progress %v; want both, %s deleting", len(got), deleting, sample)
	}
	// What finishing the delete needs (revoking upstream) is still there.
	if deleting.ClientSecret != Secret || got[sample].RefreshToken != Refresh {
		t.Error("the delete in progress lost its credentials before it was finished")
	}
	if err := s.DeleteConnection(ctx, sample, 0); err != nil {
		t.Fatalf("finish the delete: %v", err)
	}
	n := 0
	if err := s.LoadAll(ctx, func(c *storage.Connection, _ *storage.Tokens) error {
		mu.Lock()
		defer mu.Unlock()
		n++
		if c.Name == sample {
			t.Error("load all reports an erased connection")
		}
		return nil
	}); err != nil {
		t.Fatal(err)
	}
	if n != 1 {
		t.Errorf("load all after the erase: %d records, want 1", n)
	}
	if err := s.DeleteConnection(ctx, sample, 0); !errors.Is(err, storage.ErrNotFound) {
		t.Errorf("erase again: %v, want ErrNotFound", err)
	}
	if _, err := s.CreateConnection(ctx, SampleConn(sample), nil); err != nil {
		t.Errorf("create after the delete finished: %v", err)
	}
}
