package broker_test

import (
	"bytes"
	"context"
	"encoding/json"
	"log/slog"
	"net/http/httptest"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"tokenbroker/broker"
	"tokenbroker/broker/acumaticatest"
	"tokenbroker/internal/testkit"
	"tokenbroker/storage"
	"tokenbroker/storage/bolt"
)

// The "token issued" line gives expires_in in seconds, as the identity
// server's answer does, not as a Go duration in nanoseconds.
func TestTokenIssuedLogsExpiresInSeconds(t *testing.T) {
	clk := testkit.NewClock()
	idp := acumaticatest.New(acumaticatest.Options{Now: clk.Now, AccessTokenLifetime: time.Hour})
	idp.AddClient(clientID, clientSecret)
	idp.AddUser(username, password)
	hs := httptest.NewServer(idp.Handler())
	t.Cleanup(hs.Close)
	keys, err := storage.NewKeyring(make([]byte, 32))
	if err != nil {
		t.Fatal(err)
	}
	st, err := bolt.Open(filepath.Join(t.TempDir(), "db"), bolt.Options{Keyring: keys})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { st.Close() })
	var logs bytes.Buffer
	b, err := broker.New(broker.Options{Store: st, Now: clk.Now, TickInterval: -1, Logger: slog.New(slog.NewJSONHandler(&logs, nil)), AllowInsecureUpstream: true})
	if err != nil {
		t.Fatal(err)
	}
	ctx, name := context.Background(), "tenants/acme/connections/erp"
	if _, err := b.CreateConnection(ctx, &storage.Connection{
		Name: name, InstanceURL: hs.URL, ClientID: clientID, ClientSecret: clientSecret, Username: username, Password: password,
	}, false); err != nil {
		t.Fatal(err)
	}
	clk.Advance(2 * time.Hour)
	if _, err := b.GetAccessToken(ctx, name, time.Minute, ""); err != nil {
		t.Fatal(err)
	}
	b.Close()
	var issued []map[string]any
	for _, line := range strings.Split(strings.TrimSpace(logs.String()), "\n") {
		var rec map[string]any
		if json.Unmarshal([]byte(line), &rec) == nil && rec["msg"] == "token issued" {
			issued = append(issued, rec)
		}
	}
	if len(issued) == 0 {
		t.Fatalf("no token issued line in:\n%s", logs.String())
	}
	for _, rec := range issued {
		if rec["expires_in"] != float64(3600) {
			t.Errorf("expires_in %v (%T), want 3600 seconds: %v", rec["expires_in"], rec["expires_in"], rec)
		}
	}
}
