package main

import (
	"bytes"
	"context"
	"encoding/base64"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	pb "tokenbroker/gen/tokenbroker/v1"
)

// TestREADMEKeyRotation follows the README's key rotation step by step
// through the real binary, then removes the old key: every connection
// still serves, and refreshes with its sealed client secret.
func TestREADMEKeyRotation(t *testing.T) {
	_, url := idp(t)
	dir := filepath.Join(t.TempDir(), "data")
	keyFile := filepath.Join(t.TempDir(), "tokenbroker.key")
	oldKey := base64.StdEncoding.EncodeToString(bytes.Repeat([]byte{0xA1}, 32))
	newKey := base64.StdEncoding.EncodeToString(bytes.Repeat([]byte{0xB2}, 32))
	writeKeys := func(keys ...string) {
		if err := os.WriteFile(keyFile, []byte(strings.Join(keys, "\n")+"\n"), 0o600); err != nil {
			t.Fatal(err)
		}
	}
	args := []string{"--data-dir", dir, "--listen", "127.0.0.1:0", "--key-file", keyFile}
	writeKeys(oldKey)
	p := start(t, nil, args...)
	ctx := context.Background()
	tenants := []string{"tenants/t0", "tenants/t1", "tenants/t2"}
	for _, tn := range tenants {
		createConnection(t, p.client(), tn, url)
	}
	p.stop()

	// 1. Put the new key on the first line and keep the old key below it.
	writeKeys(newKey, oldKey)
	// 2. Restart.
	p = start(t, nil, args...)
	if !p.waitOutput(`"records_on_old_keys":6`, 10*time.Second) {
		t.Fatalf("the start log does not count the records on the old key:\n%s", p.out.String())
	}
	// 3. Every connection refreshes once (here at once, as the README says
	// how: a token asked for with the current one reported rejected).
	c := p.client()
	for _, tn := range tenants {
		name := tn + "/connections/erp"
		cur, err := c.GetAccessToken(ctx, &pb.GetAccessTokenRequest{Name: name})
		if err != nil {
			t.Fatal(err)
		}
		if _, err := c.GetAccessToken(ctx, &pb.GetAccessTokenRequest{Name: name, RejectedAccessToken: cur.GetAccessToken()}); err != nil {
			t.Fatal(err)
		}
	}
	p.stop()
	// 4. Restart: the log says no record needs the old key any more.
	p = start(t, nil, args...)
	if !p.waitOutput(`"records_on_old_keys":0`, 10*time.Second) {
		t.Fatalf("records still on the old key after one refresh each:\n%s", p.out.String())
	}
	p.stop()
	// 5. Remove the old line and restart.
	writeKeys(newKey)
	p = start(t, nil, args...)
	if p.addr == "" {
		t.Fatalf("the server refuses to start without the old key:\n%s", p.out.String())
	}
	c = p.client()
	for _, tn := range tenants {
		name := tn + "/connections/erp"
		cur, err := c.GetAccessToken(ctx, &pb.GetAccessTokenRequest{Name: name})
		if err != nil {
			t.Fatalf("%s after the old key went: %v\n%s", name, err, p.out.String())
		}
		// A refresh presents the resealed client secret upstream.
		if _, err := c.GetAccessToken(ctx, &pb.GetAccessTokenRequest{Name: name, RejectedAccessToken: cur.GetAccessToken()}); err != nil {
			t.Fatalf("%s refresh after the old key went: %v", name, err)
		}
	}
}
