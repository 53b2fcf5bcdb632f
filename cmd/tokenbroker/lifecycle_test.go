package main

import (
	"bytes"
	"context"
	"crypto/tls"
	"crypto/x509"
	"encoding/base64"
	"errors"
	"fmt"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"testing"
	"time"

	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials"
	"google.golang.org/grpc/credentials/insecure"

	adminv1 "tokenbroker/gen/tokenbroker/admin/v1"
	pb "tokenbroker/gen/tokenbroker/v1"

	"tokenbroker/broker/acumaticatest"
	"tokenbroker/internal/testkit"
	"tokenbroker/server/servertest"
	"tokenbroker/storage/etcdtest"
)

// These tests run the real binary: a server, and the backup, restore,
// rekey and keys status commands against it.

// cliResult is what one run of a lifecycle command did.
type cliResult struct {
	stdout, stderr string
	code           int
}

// cliOutput collects every lifecycle command's output, for leak scans.
var cliOutput testkit.LockedBuffer

// runCLI runs the binary with args and waits for it.
func runCLI(t *testing.T, env []string, args ...string) cliResult {
	t.Helper()
	defer func() { cliOutput.Write([]byte(strings.Join(args, " ") + "\n")) }()
	cmd := exec.Command(binary, args...)
	cmd.Env = append(os.Environ(), env...)
	var out, errb bytes.Buffer
	cmd.Stdout, cmd.Stderr = &out, &errb
	err := cmd.Run()
	var ee *exec.ExitError
	if err != nil && !errors.As(err, &ee) {
		t.Fatal(err)
	}
	cliOutput.Write(out.Bytes())
	cliOutput.Write(errb.Bytes())
	return cliResult{out.String(), errb.String(), cmd.ProcessState.ExitCode()}
}

// noSecretsPrinted fails if any lifecycle command printed a secret of s's.
func noSecretsPrinted(t *testing.T, s *acumaticatest.Server) {
	t.Helper()
	out := cliOutput.String()
	for _, sec := range append([]string{clientSecret, password}, s.Issued()...) {
		if strings.Contains(out, sec) {
			t.Errorf("a lifecycle command printed %.8s...", sec)
		}
	}
}

// writeKeyFile writes a key file of keys (the sealing key first).
func writeKeyFile(t *testing.T, path string, keys ...[]byte) {
	t.Helper()
	var b strings.Builder
	for _, k := range keys {
		b.WriteString(base64.StdEncoding.EncodeToString(k) + "\n")
	}
	if err := os.WriteFile(path, []byte(b.String()), 0o600); err != nil {
		t.Fatal(err)
	}
}

func dataKey(b byte) []byte { return bytes.Repeat([]byte{b}, 32) }

// manyName is the name of connection i of createMany.
func manyName(i int) string { return fmt.Sprintf("tenants/t%04d/connections/erp", i) }

// createMany creates n connections through the API, 32 at a time.
func createMany(t *testing.T, c pb.TokenBrokerClient, instanceURL string, n int) []string {
	t.Helper()
	names := make([]string, n)
	var wg sync.WaitGroup
	errs := make(chan error, n)
	sem := make(chan struct{}, 32)
	for i := range n {
		names[i] = manyName(i)
		wg.Add(1)
		sem <- struct{}{}
		go func() {
			defer func() { <-sem; wg.Done() }()
			_, err := c.CreateConnection(context.Background(), &pb.CreateConnectionRequest{
				Parent: fmt.Sprintf("tenants/t%04d", i), ConnectionId: "erp",
				Connection: &pb.Connection{InstanceUrl: instanceURL, ClientId: clientID, ClientSecret: clientSecret, Username: username, Password: password},
			})
			if err != nil {
				errs <- err
			}
		}()
	}
	wg.Wait()
	close(errs)
	for err := range errs {
		t.Fatal(err)
	}
	return names
}

// traffic calls GetAccessToken over names from 16 goroutines until stop,
// which returns how many calls were made and how many failed.
func traffic(c pb.TokenBrokerClient, names []string) (stop func() (calls, failed int64)) {
	var calls, failed atomic.Int64
	done := make(chan struct{})
	var wg sync.WaitGroup
	for g := range 16 {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for i := g; ; i++ {
				select {
				case <-done:
					return
				default:
				}
				calls.Add(1)
				if _, err := c.GetAccessToken(context.Background(), &pb.GetAccessTokenRequest{Name: names[i%len(names)]}); err != nil {
					failed.Add(1)
				}
			}
		}()
	}
	return func() (int64, int64) {
		close(done)
		wg.Wait()
		return calls.Load(), failed.Load()
	}
}

// stopServer ends p with SIGTERM, as an operator stops it.
func stopServer(t *testing.T, p *proc) {
	t.Helper()
	p.cmd.Process.Signal(syscall.SIGTERM)
	select {
	case <-p.exited:
	case <-time.After(30 * time.Second):
		t.Fatal("server did not stop")
	}
}

// adminOf returns an admin client of p.
func adminOf(t *testing.T, p *proc) adminv1.AdminBrokerClient {
	t.Helper()
	cc, err := grpc.NewClient(p.addr, grpc.WithTransportCredentials(insecure.NewCredentials()))
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { cc.Close() })
	return adminv1.NewAdminBrokerClient(cc)
}

// waitUntil polls cond until it holds, failing after a deadline.
func waitUntil(t *testing.T, what string, cond func() bool) {
	t.Helper()
	deadline := time.Now().Add(60 * time.Second)
	for !cond() {
		if time.Now().After(deadline) {
			t.Fatalf("timed out waiting until %s", what)
		}
		time.Sleep(20 * time.Millisecond)
	}
}

// forEach runs fn for every name, 16 at a time.
func forEach(names []string, fn func(name string) error) error {
	var wg sync.WaitGroup
	errs := make(chan error, len(names))
	sem := make(chan struct{}, 16)
	for _, n := range names {
		wg.Add(1)
		sem <- struct{}{}
		go func() {
			defer func() { <-sem; wg.Done() }()
			if err := fn(n); err != nil {
				errs <- err
			}
		}()
	}
	wg.Wait()
	close(errs)
	return <-errs
}

// servesAll gets a token of every connection, each of which the stand-in
// s (when given) says is live.
func servesAll(t *testing.T, c pb.TokenBrokerClient, s *acumaticatest.Server, names []string) {
	t.Helper()
	err := forEach(names, func(n string) error {
		tok, err := c.GetAccessToken(context.Background(), &pb.GetAccessTokenRequest{Name: n})
		if err != nil {
			return fmt.Errorf("%s: %w", n, err)
		}
		if s != nil && !s.AccessTokenValid(tok.GetAccessToken()) {
			return fmt.Errorf("%s: served a token the stand-in does not know as live", n)
		}
		return nil
	})
	if err != nil {
		t.Fatal(err)
	}
}

// recovered waits until every restored chain was checked (one refresh
// each, or the password grant after a rejected one): no connection still
// reports the check pending, and none is halted.
func recovered(t *testing.T, c pb.TokenBrokerClient, names []string) {
	t.Helper()
	deadline := time.Now().Add(60 * time.Second)
	err := forEach(names, func(n string) error {
		for {
			resp, err := c.GetConnection(context.Background(), &pb.GetConnectionRequest{Name: n})
			if err != nil {
				return err
			}
			conn := resp.GetConnection()
			switch {
			case conn.GetState() != pb.Connection_STATE_ACTIVE:
				return fmt.Errorf("%s is %v (%s)", n, conn.GetState(), conn.GetStatus().GetStateReason())
			case len(conn.GetStatus().GetWarnings()) == 0:
				return nil
			case time.Now().After(deadline):
				return fmt.Errorf("%s: still %q", n, conn.GetStatus().GetWarnings())
			}
			time.Sleep(20 * time.Millisecond)
		}
	})
	if err != nil {
		t.Fatal(err)
	}
}

func serveArgs(keyFile string, extra ...string) []string {
	return append([]string{"serve", "--listen", "127.0.0.1:0", "--key-file", keyFile, "--log-level", "warn"}, extra...)
}

// 1,000 connections serve tokens while a backup runs, none fails, and the
// backup verifies. Restored into a new data dir, then migrated to etcd by
// a backup of that server and back to bbolt by a backup from etcd, every
// connection serves a token with no password grant; a second restore into
// a used directory and a restore with the wrong key are refused.
func TestBackupUnderTrafficRestoreAndMigrate(t *testing.T) {
	const n = 1000
	s, url := idp(t)
	dir := t.TempDir()
	keyFile := filepath.Join(dir, "key")
	writeKeyFile(t, keyFile, dataKey(1))
	p := start(t, nil, serveArgs(keyFile, "--data-dir", filepath.Join(dir, "a"))...)
	c := p.client()
	names := createMany(t, c, url, n)

	stop := traffic(c, names)
	backup := filepath.Join(dir, "backup.db")
	res := runCLI(t, nil, "backup", "--server", p.addr, "--out", backup, "--verify", "--key-file", keyFile)
	calls, failed := stop()
	if res.code != 0 || !strings.Contains(res.stdout, fmt.Sprintf("backup: %d connections", n)) || !strings.Contains(res.stdout, "every record opens") {
		t.Fatalf("backup: exit %d\n%s%s", res.code, res.stdout, res.stderr)
	}
	if failed != 0 || calls == 0 {
		t.Fatalf("%d of %d token calls failed during the backup", failed, calls)
	}
	stopServer(t, p)
	raw, _ := os.ReadFile(backup)
	for _, sec := range append([]string{clientSecret, password}, s.Issued()...) {
		if bytes.Contains(raw, []byte(sec)) {
			t.Fatalf("the backup holds %.8s... in plain text", sec)
		}
	}
	grants := s.Counts().PasswordGrants

	// Restore into a fresh data dir.
	restored := filepath.Join(dir, "b")
	if res := runCLI(t, nil, "restore", "--from", backup, "--data-dir", restored, "--key-file", keyFile); res.code != 0 {
		t.Fatalf("restore: exit %d: %s", res.code, res.stderr)
	}
	p = start(t, nil, serveArgs(keyFile, "--data-dir", restored)...)
	servesAll(t, p.client(), s, names)
	recovered(t, p.client(), names)
	if got := s.Counts().PasswordGrants - grants; got != 0 {
		t.Fatalf("%d password grants after the restore, want 0", got)
	}

	// A second restore into the used directory is refused, running or not.
	res = runCLI(t, nil, "restore", "--from", backup, "--data-dir", restored, "--key-file", keyFile)
	if res.code != 1 || strings.Count(res.stderr, "\n") != 1 || !strings.Contains(res.stderr, "in use") {
		t.Errorf("restore into a served dir: exit %d: %q", res.code, res.stderr)
	}

	// bbolt -> etcd: back up the running server, stop it, restore into etcd.
	migrate := filepath.Join(dir, "migrate.db")
	if res := runCLI(t, nil, "backup", "--server", p.addr, "--out", migrate); res.code != 0 {
		t.Fatalf("backup: exit %d: %s", res.code, res.stderr)
	}
	stopServer(t, p)
	res = runCLI(t, nil, "restore", "--from", backup, "--data-dir", restored, "--key-file", keyFile)
	if res.code != 1 || strings.Count(res.stderr, "\n") != 1 || !strings.Contains(res.stderr, "--replace") {
		t.Errorf("second restore into a used dir: exit %d: %q", res.code, res.stderr)
	}
	endpoint := etcdtest.Start(t)
	if res := runCLI(t, nil, "restore", "--from", migrate, "--etcd-endpoints", endpoint, "--key-file", keyFile); res.code != 0 {
		t.Fatalf("restore into etcd: exit %d: %s", res.code, res.stderr)
	}
	p = start(t, nil, serveArgs(keyFile, "--data-dir", filepath.Join(dir, "e"), "--etcd-endpoints", endpoint)...)
	servesAll(t, p.client(), s, names)
	recovered(t, p.client(), names)
	if got := s.Counts().PasswordGrants - grants; got != 0 {
		t.Fatalf("%d password grants after migrating to etcd, want 0", got)
	}

	// etcd -> bbolt.
	back := filepath.Join(dir, "back.db")
	res = runCLI(t, nil, "backup", "--server", p.addr, "--out", back, "--verify", "--key-file", keyFile)
	if res.code != 0 || !strings.Contains(res.stdout, "(etcd at revision") {
		t.Fatalf("backup from etcd: exit %d: %s%s", res.code, res.stdout, res.stderr)
	}
	stopServer(t, p)
	if res := runCLI(t, nil, "restore", "--from", back, "--data-dir", filepath.Join(dir, "c"), "--key-file", keyFile); res.code != 0 {
		t.Fatalf("restore from etcd's backup: exit %d: %s", res.code, res.stderr)
	}
	p = start(t, nil, serveArgs(keyFile, "--data-dir", filepath.Join(dir, "c"))...)
	servesAll(t, p.client(), s, names)
	recovered(t, p.client(), names)
	if got := s.Counts().PasswordGrants - grants; got != 0 {
		t.Fatalf("%d password grants after migrating back to bbolt, want 0", got)
	}

	// The wrong key writes nothing.
	wrongKey := filepath.Join(dir, "wrong")
	writeKeyFile(t, wrongKey, dataKey(9))
	res = runCLI(t, nil, "restore", "--from", backup, "--data-dir", filepath.Join(dir, "d"), "--key-file", wrongKey)
	if res.code != 1 || strings.Count(res.stderr, "\n") != 1 || !strings.Contains(res.stderr, "wrong key") {
		t.Errorf("restore with the wrong key: exit %d: %q", res.code, res.stderr)
	}
	if _, err := os.Stat(filepath.Join(dir, "d", "tokenbroker.db")); !errors.Is(err, os.ErrNotExist) {
		t.Errorf("a restore with the wrong key left a data file (%v)", err)
	}
	noSecretsPrinted(t, s)
}

// A backup whose refresh tokens were all rotated after it was taken
// recovers each connection with at most one password grant, none halted.
func TestStaleBackupCostsAtMostOnePasswordGrant(t *testing.T) {
	const n = 50
	s, url := idp(t)
	dir := t.TempDir()
	keyFile := filepath.Join(dir, "key")
	writeKeyFile(t, keyFile, dataKey(1))
	p := start(t, nil, serveArgs(keyFile, "--data-dir", filepath.Join(dir, "a"))...)
	c := p.client()
	names := createMany(t, c, url, n)
	backup := filepath.Join(dir, "backup.db")
	if res := runCLI(t, nil, "backup", "--server", p.addr, "--out", backup); res.code != 0 {
		t.Fatalf("backup: exit %d: %s", res.code, res.stderr)
	}
	refreshes := s.Counts().RefreshGrants
	for _, name := range names {
		tok, err := c.GetAccessToken(context.Background(), &pb.GetAccessTokenRequest{Name: name})
		if err != nil {
			t.Fatal(err)
		}
		if _, err := c.GetAccessToken(context.Background(), &pb.GetAccessTokenRequest{Name: name, RejectedAccessToken: tok.GetAccessToken()}); err != nil {
			t.Fatal(err)
		}
	}
	if got := s.Counts().RefreshGrants - refreshes; got != n {
		t.Fatalf("%d refresh grants rotated the chains, want %d", got, n)
	}
	stopServer(t, p)
	before := s.Counts()

	restored := filepath.Join(dir, "b")
	if res := runCLI(t, nil, "restore", "--from", backup, "--data-dir", restored, "--key-file", keyFile); res.code != 0 {
		t.Fatalf("restore: exit %d: %s", res.code, res.stderr)
	}
	p = start(t, nil, serveArgs(keyFile, "--data-dir", restored)...)
	recovered(t, p.client(), names)
	servesAll(t, p.client(), s, names)
	after := s.Counts()
	if got := after.RefreshGrants - before.RefreshGrants; got != n {
		t.Errorf("%d refresh grants checked %d restored chains, want one each", got, n)
	}
	if got := after.PasswordGrants - before.PasswordGrants; got > n {
		t.Fatalf("%d password grants for %d connections, want at most one each", got, n)
	}
}

// A rekey under traffic, killed with kill -9 half-way and run again,
// leaves every record sealed with the new key and none lost: the server
// then starts with the new key alone and serves every connection without
// a password grant.
func TestRekeyKilledHalfWayAndResumed(t *testing.T) {
	const n = 400
	s, url := idp(t)
	dir := t.TempDir()
	data := filepath.Join(dir, "data")
	keyFile := filepath.Join(dir, "key")
	writeKeyFile(t, keyFile, dataKey(1))
	p := start(t, nil, serveArgs(keyFile, "--data-dir", data)...)
	names := createMany(t, p.client(), url, n)
	stopServer(t, p)
	grants := s.Counts().PasswordGrants

	writeKeyFile(t, keyFile, dataKey(2), dataKey(1))
	p = start(t, nil, serveArgs(keyFile, "--data-dir", data)...)
	admin := adminOf(t, p)
	st, err := admin.GetKeyStatus(context.Background(), &adminv1.GetKeyStatusRequest{})
	if err != nil {
		t.Fatal(err)
	}
	// Every connection and token record; the store reseals its meta
	// record itself when it opens.
	all := st.GetRecordsNeedingOlderKeys()
	if all != 2*n {
		t.Fatalf("%d records need the old key, want %d", all, 2*n)
	}
	if res := runCLI(t, nil, "keys", "status", "--server", p.addr); res.code != 1 || !strings.HasPrefix(res.stdout, "no: ") {
		t.Errorf("keys status before the rekey: exit %d: %s", res.code, res.stdout)
	}
	stop := traffic(p.client(), names)
	rekey := exec.Command(binary, "rekey", "--server", p.addr, "--batch-size", "2")
	if err := rekey.Start(); err != nil {
		t.Fatal(err)
	}
	waitUntil(t, "a quarter is resealed", func() bool {
		st, err := admin.GetKeyStatus(context.Background(), &adminv1.GetKeyStatusRequest{})
		return err == nil && st.GetRecordsNeedingOlderKeys() < all*3/4
	})
	calls, failed := stop()
	p.kill9()
	rekey.Wait()
	if failed != 0 || calls == 0 {
		t.Fatalf("%d of %d token calls failed during the rekey", failed, calls)
	}

	p = start(t, nil, serveArgs(keyFile, "--data-dir", data)...)
	st, err = adminOf(t, p).GetKeyStatus(context.Background(), &adminv1.GetKeyStatusRequest{})
	if err != nil || st.GetRecordsNeedingOlderKeys() == 0 || st.GetRecordsNeedingOlderKeys() == all {
		t.Fatalf("after kill -9: %d of %d still need the old key (%v); want some but not all", st.GetRecordsNeedingOlderKeys(), all, err)
	}
	res := runCLI(t, nil, "rekey", "--server", p.addr)
	if res.code != 0 || !strings.Contains(res.stdout, "0 still need an older key") {
		t.Fatalf("resumed rekey: exit %d: %s%s", res.code, res.stdout, res.stderr)
	}
	res = runCLI(t, nil, "keys", "status", "--server", p.addr)
	if res.code != 0 || !strings.HasPrefix(res.stdout, "yes: all ") {
		t.Fatalf("keys status: exit %d: %s%s", res.code, res.stdout, res.stderr)
	}
	stopServer(t, p)

	writeKeyFile(t, keyFile, dataKey(2))
	p = start(t, nil, serveArgs(keyFile, "--data-dir", data)...)
	if p.addr == "" {
		t.Fatalf("the server does not start with the new key alone: %s", p.out.String())
	}
	servesAll(t, p.client(), s, names)
	if got := s.Counts().PasswordGrants - grants; got != 0 {
		t.Fatalf("%d password grants after the rekey, want 0", got)
	}
	noSecretsPrinted(t, s)
}

// Every lifecycle command has --help (exit 0) and fails a wrong command
// line with exit 2; a failure is one line on stderr.
func TestLifecycleCommandsHelpAndFailures(t *testing.T) {
	for _, cmd := range [][]string{{"backup"}, {"restore"}, {"rekey"}, {"keys", "status"}} {
		res := runCLI(t, nil, append(cmd, "--help")...)
		if res.code != 0 || !strings.Contains(res.stderr, "usage: tokenbroker "+strings.Join(cmd, " ")) {
			t.Errorf("%v --help: exit %d: %s", cmd, res.code, res.stderr)
		}
		if res := runCLI(t, nil, append(cmd, "--no-such-flag")...); res.code != 2 {
			t.Errorf("%v --no-such-flag: exit %d", cmd, res.code)
		}
	}
	for _, tc := range []struct {
		args []string
		want string
	}{
		{[]string{"backup", "--server", "127.0.0.1:1"}, "--out is required"},
		{[]string{"backup", "--server", "10.1.2.3:50051", "--out", filepath.Join(t.TempDir(), "b")}, "refusing plaintext"},
		{[]string{"restore", "--from", "x"}, "exactly one of --data-dir and --etcd-endpoints"},
		{[]string{"restore", "--from", filepath.Join(t.TempDir(), "none"), "--data-dir", t.TempDir(), "--key-file", "/dev/null"}, "key"},
		{[]string{"rekey", "--server", "127.0.0.1:1", "--timeout", "2s"}, "server answered Unavailable"},
	} {
		res := runCLI(t, nil, tc.args...)
		if res.code != 1 || strings.Count(res.stderr, "\n") != 1 || !strings.Contains(res.stderr, tc.want) {
			t.Errorf("%v: exit %d: %q, want one line with %q", tc.args, res.code, res.stderr, tc.want)
		}
	}
}

// On etcd a rekey is refused while a replica seals with another key, and
// keys status says no; once every replica seals with the new key, the
// rekey runs and the old key may go.
func TestRekeyOnEtcdNeedsEveryReplicaOnTheNewKey(t *testing.T) {
	_, url := idp(t)
	dir := t.TempDir()
	endpoint := etcdtest.Start(t)
	oldKey, newKeys := filepath.Join(dir, "old"), filepath.Join(dir, "new")
	writeKeyFile(t, oldKey, dataKey(1))
	writeKeyFile(t, newKeys, dataKey(2), dataKey(1))
	etcdArgs := func(keyFile, data string) []string {
		return serveArgs(keyFile, "--data-dir", filepath.Join(dir, data), "--etcd-endpoints", endpoint)
	}
	a := start(t, nil, etcdArgs(oldKey, "a")...)
	names := createMany(t, a.client(), url, 20)
	b := start(t, nil, etcdArgs(newKeys, "b")...)

	res := runCLI(t, nil, "rekey", "--server", b.addr)
	if res.code != 1 || !strings.Contains(res.stderr, "FailedPrecondition") || !strings.Contains(res.stderr, "seals with key id") {
		t.Errorf("rekey with a replica on the old key: exit %d: %q", res.code, res.stderr)
	}
	res = runCLI(t, nil, "keys", "status", "--server", b.addr)
	if res.code != 1 || !strings.HasPrefix(res.stdout, "no: replica ") {
		t.Errorf("keys status with a replica on the old key: exit %d: %s", res.code, res.stdout)
	}

	stopServer(t, a)
	a = start(t, nil, etcdArgs(newKeys, "a")...)
	if res := runCLI(t, nil, "rekey", "--server", b.addr); res.code != 0 {
		t.Fatalf("rekey: exit %d: %s%s", res.code, res.stdout, res.stderr)
	}
	if res := runCLI(t, nil, "keys", "status", "--server", a.addr); res.code != 0 || !strings.HasPrefix(res.stdout, "yes: ") {
		t.Fatalf("keys status: exit %d: %s", res.code, res.stdout)
	}
	servesAll(t, a.client(), nil, names)
}

// Over mTLS the commands take grpcurl's flags: an operator of every tenant
// backs up and asks for key status; an operator of one tenant and a
// consumer are refused with one line.
func TestLifecycleCommandsOverMTLS(t *testing.T) {
	_, url := idp(t)
	dir := t.TempDir()
	ca := servertest.NewCA(t, "test CA")
	certPath, keyPath := servertest.WritePair(t, dir, "server", ca.Issue(t, servertest.Leaf{CN: "tokenbroker", IPs: []net.IP{net.ParseIP("127.0.0.1")}, Server: true}))
	caPath := filepath.Join(dir, "ca.pem")
	os.WriteFile(caPath, ca.PEM, 0o600)
	policy := filepath.Join(dir, "policy.yaml")
	os.WriteFile(policy, []byte(`rules:
  - identities: ["spiffe://corp.test/ops/root"]
    role: operator
    tenants: ["*"]
  - identities: ["spiffe://corp.test/ops/acme"]
    role: operator
    tenants: ["t0000"]
  - identities: ["spiffe://corp.test/svc/orders"]
    role: consumer
    tenants: ["*"]
`), 0o600)
	keyFile := filepath.Join(dir, "key")
	writeKeyFile(t, keyFile, dataKey(1))
	p := start(t, nil, serveArgs(keyFile, "--data-dir", filepath.Join(dir, "data"),
		"--tls-cert", certPath, "--tls-key", keyPath, "--client-ca", caPath, "--policy", policy, "--allow-insecure-upstream")...)
	if p.addr == "" {
		t.Fatalf("did not start: %s", p.out.String())
	}
	who := map[string][2]string{}
	for _, id := range []string{"root", "acme"} {
		c, k := servertest.WritePair(t, dir, id, ca.Issue(t, servertest.Leaf{URI: "spiffe://corp.test/ops/" + id}))
		who[id] = [2]string{c, k}
	}
	c, k := servertest.WritePair(t, dir, "orders", ca.Issue(t, servertest.Leaf{URI: "spiffe://corp.test/svc/orders"}))
	who["orders"] = [2]string{c, k}
	tlsArgs := func(id string) []string {
		return []string{"--server", p.addr, "--cacert", caPath, "--cert", who[id][0], "--key", who[id][1]}
	}
	root := adminDial(t, p.addr, ca, "spiffe://corp.test/ops/root")
	createMany(t, root, url, 3)

	backup := filepath.Join(dir, "backup.db")
	res := runCLI(t, nil, append([]string{"backup", "--out", backup, "--verify", "--key-file", keyFile}, tlsArgs("root")...)...)
	if res.code != 0 || !strings.Contains(res.stdout, "backup: 3 connections") {
		t.Fatalf("backup as root: exit %d: %s%s", res.code, res.stdout, res.stderr)
	}
	if res := runCLI(t, nil, append([]string{"keys", "status"}, tlsArgs("root")...)...); res.code != 0 {
		t.Errorf("keys status as root: exit %d: %s%s", res.code, res.stdout, res.stderr)
	}
	for _, id := range []string{"acme", "orders"} {
		res := runCLI(t, nil, append([]string{"backup", "--out", filepath.Join(dir, id+".db")}, tlsArgs(id)...)...)
		if res.code != 1 || strings.Count(res.stderr, "\n") != 1 || !strings.Contains(res.stderr, "PermissionDenied") {
			t.Errorf("backup as %s: exit %d: %q", id, res.code, res.stderr)
		}
		if _, err := os.Stat(filepath.Join(dir, id+".db")); !errors.Is(err, os.ErrNotExist) {
			t.Errorf("a refused backup left a file (%v)", err)
		}
	}
}

// adminDial returns a TokenBroker client over mTLS as uri.
func adminDial(t *testing.T, addr string, ca *servertest.CA, uri string) pb.TokenBrokerClient {
	t.Helper()
	pool := x509.NewCertPool()
	pool.AddCert(ca.Cert)
	cfg := &tls.Config{RootCAs: pool, MinVersion: tls.VersionTLS12, Certificates: []tls.Certificate{ca.Issue(t, servertest.Leaf{URI: uri})}}
	cc, err := grpc.NewClient(addr, grpc.WithTransportCredentials(credentials.NewTLS(cfg)))
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { cc.Close() })
	return pb.NewTokenBrokerClient(cc)
}
