package main

import (
	"bufio"
	"bytes"
	"context"
	"fmt"
	"io"
	"net/http/httptest"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"strings"
	"syscall"
	"testing"
	"time"

	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials/insecure"
	"google.golang.org/grpc/reflection/grpc_reflection_v1"

	pb "tokenbroker/gen/tokenbroker/v1"

	"tokenbroker/broker/acumaticatest"
	"tokenbroker/internal/testkit"
)

// These tests run the real binary.

var binary string

func TestMain(m *testing.M) {
	dir, err := os.MkdirTemp("", "tokenbroker-bin")
	if err != nil {
		fmt.Fprintln(os.Stderr, err)
		os.Exit(1)
	}
	binary = filepath.Join(dir, "tokenbroker")
	if out, err := exec.Command("go", "build", "-o", binary, ".").CombinedOutput(); err != nil {
		fmt.Fprintf(os.Stderr, "build: %v\n%s", err, out)
		os.Exit(1)
	}
	code := m.Run()
	os.RemoveAll(dir)
	os.Exit(code)
}

const (
	clientID     = "88358B02-A48D-A50E-F710-39C1636C30F6@MyTenant"
	clientSecret = "BIN-client-secret-5e1f0a"
	username     = "integration"
	password     = "BIN-user-password-9d3c7b"
	connName     = "tenants/acme/connections/erp"
)

type proc struct {
	t      *testing.T
	cmd    *exec.Cmd
	out    *testkit.LockedBuffer
	addr   string
	exited chan struct{}
	err    error
}

var servingLine = regexp.MustCompile(`serving on (\S+) `)

// start runs the binary and waits until it serves or exits.
func start(t *testing.T, env []string, args ...string) *proc {
	t.Helper()
	cmd := exec.Command(binary, args...)
	// The stand-ins serve on loopback; a test may say otherwise in env.
	cmd.Env = append(append(os.Environ(), "TOKENBROKER_ALLOW_UPSTREAM_CIDR=127.0.0.0/8"), env...)
	return startCmd(t, cmd)
}

// startCmd runs cmd, a command that runs the binary, and waits until the
// binary serves or cmd exits.
func startCmd(t *testing.T, cmd *exec.Cmd) *proc {
	t.Helper()
	p := &proc{t: t, cmd: cmd, out: &testkit.LockedBuffer{}, exited: make(chan struct{})}
	pr, pw := io.Pipe()
	p.cmd.Stderr = io.MultiWriter(p.out, pw)
	p.cmd.Stdout = p.out
	if err := p.cmd.Start(); err != nil {
		t.Fatal(err)
	}
	go func() {
		p.err = p.cmd.Wait()
		pw.Close()
		close(p.exited)
	}()
	found := make(chan string, 1)
	go func() {
		sc := bufio.NewScanner(pr)
		for sc.Scan() {
			if m := servingLine.FindStringSubmatch(sc.Text()); m != nil {
				found <- m[1]
			}
		}
		io.Copy(io.Discard, pr)
	}()
	t.Cleanup(func() {
		p.cmd.Process.Kill()
		<-p.exited
	})
	select {
	case p.addr = <-found:
	case <-p.exited:
	case <-time.After(30 * time.Second):
		t.Fatalf("binary did not start: %s", p.out.String())
	}
	return p
}

func (p *proc) kill9() {
	p.cmd.Process.Signal(syscall.SIGKILL)
	<-p.exited
}

func (p *proc) client() pb.TokenBrokerClient {
	p.t.Helper()
	cc, err := grpc.NewClient(p.addr, grpc.WithTransportCredentials(insecure.NewCredentials()))
	if err != nil {
		p.t.Fatal(err)
	}
	p.t.Cleanup(func() { cc.Close() })
	return pb.NewTokenBrokerClient(cc)
}

func TestServesWithReflectionOnFreshDataDir(t *testing.T) {
	dir := filepath.Join(t.TempDir(), "data")
	p := start(t, nil, "serve", "--listen", "127.0.0.1:0", "--data-dir", dir)
	if p.addr == "" {
		t.Fatalf("did not serve: %s", p.out.String())
	}
	cc, _ := grpc.NewClient(p.addr, grpc.WithTransportCredentials(insecure.NewCredentials()))
	defer cc.Close()
	stream, err := grpc_reflection_v1.NewServerReflectionClient(cc).ServerReflectionInfo(context.Background())
	if err != nil {
		t.Fatal(err)
	}
	stream.Send(&grpc_reflection_v1.ServerReflectionRequest{MessageRequest: &grpc_reflection_v1.ServerReflectionRequest_ListServices{}})
	resp, err := stream.Recv()
	if err != nil {
		t.Fatal(err)
	}
	var names []string
	for _, s := range resp.GetListServicesResponse().GetService() {
		names = append(names, s.GetName())
	}
	if !strings.Contains(strings.Join(names, " "), "tokenbroker.v1.TokenBroker") {
		t.Errorf("reflection lists %v", names)
	}
	stream.CloseSend()
	cc.Close()
	info, err := os.Stat(filepath.Join(dir, "tokenbroker.key"))
	if err != nil || info.Mode().Perm() != 0o600 {
		t.Errorf("generated key file: %v %v", info, err)
	}
	if _, err := os.Stat(filepath.Join(dir, "tokenbroker.db")); err != nil {
		t.Error(err)
	}
	// SIGTERM stops it cleanly.
	p.cmd.Process.Signal(syscall.SIGTERM)
	select {
	case <-p.exited:
		if p.err != nil {
			t.Errorf("exit after SIGTERM: %v\n%s", p.err, p.out.String())
		}
	case <-time.After(20 * time.Second):
		t.Fatal("did not stop on SIGTERM")
	}
}

func TestStartRefusals(t *testing.T) {
	for _, tc := range []struct {
		name  string
		setup func(t *testing.T, dir string)
		env   []string
		args  []string
		want  string
	}{
		{"non-loopback without TLS", nil, nil, []string{"--listen", "0.0.0.0:0"}, "refusing to listen on 0.0.0.0:0 without TLS"},
		{"environment variable read", nil, []string{"TOKENBROKER_LISTEN=0.0.0.0:0"}, []string{}, "refusing to listen"},
		{"negative heap floor", nil, []string{"TOKENBROKER_GC_HEAP_FLOOR_MIB=-1"}, []string{}, "--gc-heap-floor-mib must not be negative"},
		{"corrupt data file", func(t *testing.T, dir string) {
			os.MkdirAll(dir, 0o700)
			os.WriteFile(filepath.Join(dir, "tokenbroker.db"), bytes.Repeat([]byte("garbage!"), 4096), 0o600)
			os.WriteFile(filepath.Join(dir, "tokenbroker.key"), []byte(strings.Repeat("A", 43)+"=\n"), 0o600)
		}, nil, []string{"--listen", "127.0.0.1:0"}, "not a tokenbroker data file"},
		{"missing key for existing data", func(t *testing.T, dir string) {
			os.MkdirAll(dir, 0o700)
			os.WriteFile(filepath.Join(dir, "tokenbroker.db"), bytes.Repeat([]byte("garbage!"), 4096), 0o600)
		}, nil, []string{"--listen", "127.0.0.1:0"}, "key file"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			dir := filepath.Join(t.TempDir(), "data")
			if tc.setup != nil {
				tc.setup(t, dir)
			}
			var before [32]byte
			db := filepath.Join(dir, "tokenbroker.db")
			if _, err := os.Stat(db); err == nil {
				before = testkit.FileSum(t, db)
			}
			args := append([]string{"--data-dir", dir}, tc.args...)
			p := start(t, tc.env, args...)
			<-p.exited
			if p.err == nil || !strings.Contains(p.out.String(), tc.want) {
				t.Errorf("exit %v, output %q, want failure saying %q", p.err, p.out.String(), tc.want)
			}
			if before != [32]byte{} && testkit.FileSum(t, db) != before {
				t.Error("data file modified")
			}
		})
	}
}

func TestSecondProcessAndWrongKey(t *testing.T) {
	dir := filepath.Join(t.TempDir(), "data")
	keyA := "TOKENBROKER_KEY=" + strings.Repeat("A", 43) + "="
	keyB := "TOKENBROKER_KEY=" + strings.Repeat("B", 43) + "="
	first := start(t, []string{keyA}, "--data-dir", dir, "--listen", "127.0.0.1:0")
	if first.addr == "" {
		t.Fatalf("first did not start: %s", first.out.String())
	}
	began := time.Now()
	second := start(t, []string{keyA}, "--data-dir", dir, "--listen", "127.0.0.1:0")
	<-second.exited
	if second.err == nil || !strings.Contains(second.out.String(), "in use by another process") {
		t.Errorf("second process: %v %q", second.err, second.out.String())
	}
	if d := time.Since(began); d > 10*time.Second {
		t.Errorf("second process took %v to fail", d)
	}
	first.cmd.Process.Signal(syscall.SIGTERM)
	<-first.exited
	db := filepath.Join(dir, "tokenbroker.db")
	before := testkit.FileSum(t, db)
	wrong := start(t, []string{keyB}, "--data-dir", dir, "--listen", "127.0.0.1:0")
	<-wrong.exited
	if wrong.err == nil || !strings.Contains(wrong.out.String(), "wrong key") {
		t.Errorf("wrong key: %v %q", wrong.err, wrong.out.String())
	}
	if testkit.FileSum(t, db) != before {
		t.Error("wrong key modified the data file")
	}
}

// createConnection registers connection "erp" of the parent tenant with the
// stand-in's credentials.
func createConnection(t *testing.T, c pb.TokenBrokerClient, parent, instanceURL string) {
	t.Helper()
	if _, err := c.CreateConnection(context.Background(), &pb.CreateConnectionRequest{Parent: parent, ConnectionId: "erp", Connection: &pb.Connection{
		InstanceUrl: instanceURL, ClientId: clientID, ClientSecret: clientSecret, Username: username, Password: password,
	}}); err != nil {
		t.Fatal(err)
	}
}

// idp runs the stand-in in this test process.
func idp(t *testing.T) (*acumaticatest.Server, string) {
	s := acumaticatest.New(acumaticatest.Options{})
	s.AddClient(clientID, clientSecret)
	s.AddUser(username, password)
	hs := httptest.NewServer(s.Handler())
	t.Cleanup(hs.Close)
	return s, hs.URL
}

func TestKill9DuringRefresh(t *testing.T) {
	for _, tc := range []struct {
		name string
		// fault returns the fault to inject and the channel that says the
		// moment to kill has come.
		fault func() (acumaticatest.Fault, chan struct{})
		// Grants the restarted process makes: with a refresh in flight at
		// the kill, whether or not upstream processed it, the broker cannot
		// know the refresh token was not spent: it never presents it again
		// but revokes it and signs in once.
		wantPassword, wantRefresh int
	}{
		{"before upstream processed it", func() (acumaticatest.Fault, chan struct{}) {
			ch := make(chan struct{}, 1)
			return acumaticatest.Fault{Arrived: ch, Delay: time.Minute}, ch
		}, 1, 0},
		{"after upstream spent the refresh token", func() (acumaticatest.Fault, chan struct{}) {
			ch := make(chan struct{}, 1)
			return acumaticatest.Fault{Processed: ch, HoldAfterProcess: time.Minute}, ch
		}, 1, 0},
		{"after the commit", nil, 0, 0},
	} {
		t.Run(tc.name, func(t *testing.T) {
			s, url := idp(t)
			dir := filepath.Join(t.TempDir(), "data")
			p := start(t, nil, "--data-dir", dir, "--listen", "127.0.0.1:0", "--log-level", "debug")
			c := p.client()
			ctx := context.Background()
			createConnection(t, c, "tenants/acme", url)
			t1, err := c.GetAccessToken(ctx, &pb.GetAccessTokenRequest{Name: connName})
			if err != nil {
				t.Fatal(err)
			}
			var committed string
			if tc.fault != nil {
				f, moment := tc.fault()
				s.Inject(f)
				go c.GetAccessToken(ctx, &pb.GetAccessTokenRequest{Name: connName, RejectedAccessToken: t1.GetAccessToken()})
				<-moment
			} else {
				t2, err := c.GetAccessToken(ctx, &pb.GetAccessTokenRequest{Name: connName, RejectedAccessToken: t1.GetAccessToken()})
				if err != nil {
					t.Fatal(err)
				}
				committed = t2.GetAccessToken()
			}
			p.kill9()
			s.ClearFaults()
			atKill := s.Counts()

			p2 := start(t, nil, "--data-dir", dir, "--listen", "127.0.0.1:0", "--log-level", "debug")
			c2 := p2.client()
			var tok string
			if committed != "" {
				got, err := c2.GetAccessToken(ctx, &pb.GetAccessTokenRequest{Name: connName})
				if err != nil {
					t.Fatal(err)
				}
				if got.GetAccessToken() != committed {
					t.Error("restart did not serve the committed token")
				}
				tok = got.GetAccessToken()
			} else {
				// Report the old token rejected: this joins (or starts) the
				// recovery refresh and returns its outcome.
				got, err := c2.GetAccessToken(ctx, &pb.GetAccessTokenRequest{Name: connName, RejectedAccessToken: t1.GetAccessToken()})
				if err != nil {
					t.Fatalf("after restart: %v\n%s", err, p2.out.String())
				}
				tok = got.GetAccessToken()
			}
			if !s.AccessTokenValid(tok) {
				t.Error("served token is not live upstream")
			}
			counts := s.Counts()
			if got := counts.PasswordGrants - atKill.PasswordGrants; got != tc.wantPassword {
				t.Errorf("password grants after the restart = %d, want %d (%+v)", got, tc.wantPassword, counts)
			}
			if got := counts.RefreshGrants - atKill.RefreshGrants; got != tc.wantRefresh {
				t.Errorf("refresh grants after the restart = %d, want %d: the refresh token in flight at the kill was presented again", got, tc.wantRefresh)
			}
			if counts.ReuseDetected != 0 {
				t.Errorf("refresh token reused %d times", counts.ReuseDetected)
			}
			conn, err := c2.GetConnection(ctx, &pb.GetConnectionRequest{Name: connName})
			if err != nil || conn.GetConnection().GetState() != pb.Connection_STATE_ACTIVE {
				t.Errorf("state after recovery: %v %v", conn.GetConnection().GetState(), err)
			}
			for _, sec := range append([]string{clientSecret, password}, s.Issued()...) {
				if strings.Contains(p.out.String()+p2.out.String(), sec) {
					t.Errorf("secret %.8s... in the server's output", sec)
				}
				raw, _ := os.ReadFile(filepath.Join(dir, "tokenbroker.db"))
				if bytes.Contains(raw, []byte(sec)) {
					t.Errorf("secret %.8s... in plain text in the data file", sec)
				}
			}
		})
	}
}

// A numeric flag out of range stops the binary before it opens anything,
// with one line naming the flag and the allowed range.
func TestNegativeRateLimitRefusesToStart(t *testing.T) {
	dir := filepath.Join(t.TempDir(), "data")
	p := start(t, nil, "serve", "--data-dir", dir, "--listen", "127.0.0.1:0", "--rate-limit", "-5")
	<-p.exited
	if p.addr != "" || p.err == nil {
		t.Fatalf("started or exited 0 (%v): %s", p.err, p.out.String())
	}
	want := "tokenbroker: --rate-limit must not be negative, not -5 (allowed: 0 to 1000000; 0: no limit)\n"
	if got := p.out.String(); got != want {
		t.Errorf("output %q, want exactly %q", got, want)
	}
	if _, err := os.Stat(dir); err == nil {
		t.Error("data dir created before the configuration was checked")
	}
}
