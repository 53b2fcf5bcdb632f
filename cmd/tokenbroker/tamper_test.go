package main

import (
	"bytes"
	"context"
	"net/http"
	"net/http/httptest"
	"os"
	"path/filepath"
	"strings"
	"sync/atomic"
	"syscall"
	"testing"
	"time"

	pb "tokenbroker/gen/tokenbroker/v1"

	"tokenbroker/storage/etcdtest"
)

// stop ends the binary as an orchestrator does, with SIGTERM.
func (p *proc) stop() {
	p.cmd.Process.Signal(syscall.SIGTERM)
	<-p.exited
}

// attacker is a host that counts every request it gets, with a URL as long
// as like's, so that its URL can replace like in a record's bytes.
func attacker(t *testing.T, like string) (string, *atomic.Int64) {
	t.Helper()
	var hits atomic.Int64
	for range 20 {
		hs := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
			hits.Add(1)
			w.WriteHeader(http.StatusOK)
		}))
		t.Cleanup(hs.Close)
		if len(hs.URL) == len(like) && hs.URL != like {
			return hs.URL, &hits
		}
	}
	t.Fatal("no attacker URL as long as the upstream's")
	return "", nil
}

// expectRefusal waits for the binary to exit after it refused the
// rewritten connection, and checks what it said.
func expectRefusal(t *testing.T, p *proc, secrets ...string) {
	t.Helper()
	if p.addr != "" {
		// It served while loading: a caller asking for the connection gets
		// nothing, and nothing is sent anywhere.
		c := p.client()
		ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
		_, err := c.GetAccessToken(ctx, &pb.GetAccessTokenRequest{Name: connName})
		cancel()
		if err == nil {
			t.Error("the rewritten connection served a token")
		}
	}
	select {
	case <-p.exited:
	case <-time.After(20 * time.Second):
		t.Fatalf("the binary kept running on a rewritten record:\n%s", p.out.String())
	}
	out := p.out.String()
	if !strings.Contains(out, connName) || !strings.Contains(out, "integrity check") {
		t.Errorf("the refusal does not name the connection and the failed check:\n%s", out)
	}
	for _, sec := range secrets {
		if strings.Contains(out, sec) {
			t.Errorf("the output holds a secret (%.6s...)", sec)
		}
	}
}

// TestRewrittenInstanceURLSendsNothing rewrites a connection's instance URL
// in the bytes of the real data file, as someone with write access to the
// volume but no key would, and restarts: the binary refuses the record,
// naming it, and not one request reaches the rewritten host.
func TestRewrittenInstanceURLSendsNothing(t *testing.T) {
	_, url := idp(t)
	dir := filepath.Join(t.TempDir(), "data")
	p := start(t, nil, "--data-dir", dir, "--listen", "127.0.0.1:0")
	createConnection(t, p.client(), "tenants/acme", url)
	if _, err := p.client().GetAccessToken(context.Background(), &pb.GetAccessTokenRequest{Name: connName}); err != nil {
		t.Fatal(err)
	}
	p.stop()

	evil, hits := attacker(t, url)
	path := filepath.Join(dir, "tokenbroker.db")
	raw, err := os.ReadFile(path)
	if err != nil {
		t.Fatal(err)
	}
	if !bytes.Contains(raw, []byte(url)) {
		t.Fatal("sanity: the data file does not hold the instance URL")
	}
	if err := os.WriteFile(path, bytes.ReplaceAll(raw, []byte(url), []byte(evil)), 0o600); err != nil {
		t.Fatal(err)
	}

	p2 := start(t, nil, "--data-dir", dir, "--listen", "127.0.0.1:0")
	expectRefusal(t, p2, clientSecret, password)
	if n := hits.Load(); n != 0 {
		t.Errorf("%d requests reached the rewritten host", n)
	}
}

// TestRewrittenInstanceURLSendsNothingOnEtcd is the same with the value
// rewritten in etcd through a raw client.
func TestRewrittenInstanceURLSendsNothingOnEtcd(t *testing.T) {
	_, url := idp(t)
	endpoint := etcdtest.Start(t)
	env := []string{"TOKENBROKER_KEY=" + strings.Repeat("D", 43) + "=", "TOKENBROKER_ETCD_ENDPOINTS=" + endpoint}
	dir := filepath.Join(t.TempDir(), "data")
	p := start(t, env, "--data-dir", dir, "--listen", "127.0.0.1:0")
	createConnection(t, p.client(), "tenants/acme", url)
	p.stop()

	evil, hits := attacker(t, url)
	cli := etcdtest.Client(t, endpoint)
	ctx := context.Background()
	key := "/tokenbroker/connections/" + connName
	resp, err := cli.Get(ctx, key)
	if err != nil || len(resp.Kvs) != 1 || !bytes.Contains(resp.Kvs[0].Value, []byte(url)) {
		t.Fatalf("sanity: %s does not hold the instance URL: %v", key, err)
	}
	if _, err := cli.Put(ctx, key, strings.ReplaceAll(string(resp.Kvs[0].Value), url, evil)); err != nil {
		t.Fatal(err)
	}

	p2 := start(t, env, "--data-dir", dir, "--listen", "127.0.0.1:0")
	expectRefusal(t, p2, clientSecret, password)
	if n := hits.Load(); n != 0 {
		t.Errorf("%d requests reached the rewritten host", n)
	}
}
