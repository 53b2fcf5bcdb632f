package storage_test

import (
	"bytes"
	"errors"
	"testing"
	"time"

	"tokenbroker/storage"
	"tokenbroker/storage/storetest"
)

func TestAuthorizationRecordRoundTripAndSeal(t *testing.T) {
	cd := storage.NewCodec(storetest.Keyring(t, storetest.Key(1)))
	conn := storetest.SampleConn("tenants/a/connections/x")
	conn.Username, conn.Password = "", ""
	a := &storage.Authorization{Name: conn.Name, Conn: conn, Existing: true, ETag: "3-abc",
		Verifier: "verifier-0123456789-abcdefghijklmnopqrstuvwxyzABCD", ExpireTime: time.Unix(1700000600, 0).UTC()}
	v, err := cd.EncodeAuthorization("key-1", a)
	if err != nil {
		t.Fatal(err)
	}
	for _, secret := range []string{a.Verifier, storetest.Secret} {
		if bytes.Contains(v, []byte(secret)) {
			t.Fatalf("a secret is stored in plain text")
		}
	}
	got, err := cd.DecodeAuthorization("key-1", v)
	if err != nil {
		t.Fatal(err)
	}
	if got.Verifier != a.Verifier || got.Conn.ClientSecret != storetest.Secret || got.Conn.RedirectURI != conn.RedirectURI ||
		got.ETag != "3-abc" || !got.Existing || !got.ExpireTime.Equal(a.ExpireTime) || got.Name != a.Name {
		t.Fatalf("round trip: %+v", got)
	}
	if _, err := cd.DecodeAuthorization("key-2", v); err == nil {
		t.Fatal("a record moved to another state's key opened")
	}
	if _, err := cd.DecodeAuthorization("key-1", bytes.Replace(v, []byte("3-abc"), []byte("4-abc"), 1)); !errors.Is(err, storage.ErrTampered) {
		t.Fatalf("an authorization whose etag was changed opened: %v", err)
	}
	changed := bytes.Replace(v, []byte(conn.RedirectURI), []byte("https://evil.example.com/callbac"), 1)
	if _, err := cd.DecodeAuthorization("key-1", changed); !errors.Is(err, storage.ErrTampered) {
		t.Fatalf("a rewritten redirect URI: %v, want ErrTampered", err)
	}
	other := storage.NewCodec(storetest.Keyring(t, storetest.Key(2)))
	if _, err := other.DecodeAuthorization("key-1", v); err == nil {
		t.Fatal("opened with another key")
	}
}
