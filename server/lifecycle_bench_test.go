package server_test

import (
	"context"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strconv"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials/insecure"

	adminv1 "tokenbroker/gen/tokenbroker/admin/v1"
	pb "tokenbroker/gen/tokenbroker/v1"

	"tokenbroker/broker"
	"tokenbroker/server"
	"tokenbroker/storage"
	"tokenbroker/storage/bolt"
)

// BenchmarkLifecycle measures the admin service on a bbolt store of 1k,
// 10k and 100k connections (LIFECYCLE_BENCH_MAX lowers the largest), each
// figure against its baseline in the same run:
//
//   - backup: connections per second of a whole backup (the admin
//     service's stream written into a backup file), median of 3;
//   - at the largest size only: cached GetAccessToken calls per second
//     while one backup runs, against windows as long just before and
//     after it (median of 5 rounds' ratios);
//   - rekey: stored values resealed per second by one Rekey call, after
//     the key file got a new first key.
//
// go test -run '^$' -bench Lifecycle -benchtime 1x -timeout 30m ./server/
func BenchmarkLifecycle(b *testing.B) {
	largest := 100_000
	if v, err := strconv.Atoi(os.Getenv("LIFECYCLE_BENCH_MAX")); err == nil && v > 0 {
		largest = v
	}
	for _, n := range []int{1_000, 10_000, 100_000} {
		if n > largest {
			break
		}
		b.Run(fmt.Sprintf("connections=%d", n), func(b *testing.B) {
			for b.Loop() {
				benchLifecycle(b, n, n == largest)
			}
		})
	}
}

func benchLifecycle(b *testing.B, n int, withTraffic bool) {
	dir := b.TempDir()
	path := filepath.Join(dir, "tokenbroker.db")
	oldKey, newKey := make([]byte, 32), make([]byte, 32)
	newKey[0] = 1
	st := benchStore(b, path, oldKey)
	populate(b, st, n)
	env := serveBench(b, st)

	backupRate := median(3, func() float64 { return float64(n) / benchBackup(b, env.addr, dir).Seconds() })
	b.ReportMetric(backupRate, "backup-conns/s")
	if withTraffic {
		plain, during, ratio := trafficRatio(b, env, n, dir)
		b.ReportMetric(plain, "cached-calls/s")
		b.ReportMetric(during, "cached-calls/s-during-backup")
		b.ReportMetric(ratio, "during/without")
	}
	env.stop()
	st.Close()

	st = benchStore(b, path, newKey, oldKey)
	defer st.Close()
	env = serveBench(b, st)
	defer env.stop()
	start := time.Now()
	resealed := benchRekey(b, env.admin)
	b.ReportMetric(float64(resealed)/time.Since(start).Seconds(), "rekey-records/s")
}

func benchStore(b *testing.B, path string, keys ...[]byte) *bolt.Store {
	kr, err := storage.NewKeyring(keys...)
	if err != nil {
		b.Fatal(err)
	}
	st, err := bolt.Open(path, bolt.Options{Keyring: kr})
	if err != nil {
		b.Fatal(err)
	}
	return st
}

func benchName(i int) string { return fmt.Sprintf("tenants/t%06d/connections/erp", i) }

// populate stores n connections with a live access token each, from 64
// writers so that the group committer fills its transactions.
func populate(b *testing.B, st *bolt.Store, n int) {
	now := time.Now()
	var next atomic.Int64
	var wg sync.WaitGroup
	for range 64 {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for i := int(next.Add(1)) - 1; i < n; i = int(next.Add(1)) - 1 {
				c := &storage.Connection{Name: benchName(i), InstanceURL: "https://erp.example.com", ClientID: clientID,
					ClientSecret: clientSecret, Username: username, Password: password, Scopes: []string{"api", "offline_access"}, CreateTime: now, UpdateTime: now}
				t := &storage.Tokens{Generation: 1, RefreshToken: fmt.Sprintf("rt-%064d", i), AccessToken: fmt.Sprintf("at-%01000d", i),
					TokenType: "Bearer", IssueTime: now, AccessTokenExpireTime: now.Add(24 * time.Hour), ChainStartTime: now, RefreshTokenUseTime: now, State: "ACTIVE"}
				if _, err := st.CreateConnection(context.Background(), c, t); err != nil {
					b.Error(err)
					return
				}
			}
		}()
	}
	wg.Wait()
}

// benchEnv is a broker with every connection loaded, served on loopback
// with the admin service.
type benchEnv struct {
	addr   string
	client pb.TokenBrokerClient
	admin  adminv1.AdminBrokerClient
	stop   func()
}

func serveBench(b *testing.B, st *bolt.Store) *benchEnv {
	br, err := broker.New(broker.Options{Store: st, TickInterval: -1})
	if err != nil {
		b.Fatal(err)
	}
	if _, err := br.Load(context.Background()); err != nil {
		b.Fatal(err)
	}
	srv := server.New(server.Options{Broker: br, Logger: slog.New(slog.NewJSONHandler(io.Discard, nil)), Admin: st})
	lis, _ := net.Listen("tcp", "127.0.0.1:0")
	go srv.Serve(lis)
	cc, err := grpc.NewClient(lis.Addr().String(), grpc.WithTransportCredentials(insecure.NewCredentials()),
		grpc.WithDefaultCallOptions(grpc.MaxCallRecvMsgSize(16<<20)))
	if err != nil {
		b.Fatal(err)
	}
	return &benchEnv{
		addr:   lis.Addr().String(),
		client: pb.NewTokenBrokerClient(cc), admin: adminv1.NewAdminBrokerClient(cc),
		stop: func() { cc.Close(); srv.Stop(); br.Close() },
	}
}

// benchBackup takes one backup into a file from another process, as the
// backup command does (the client's decoding and writing do not share the
// server's heap), and returns how long it took.
func benchBackup(b *testing.B, addr, dir string) time.Duration {
	start := time.Now()
	cmd := exec.Command(os.Args[0])
	cmd.Env = append(os.Environ(), backupClientEnv+"="+addr, backupOutEnv+"="+filepath.Join(dir, "backup.db"))
	if out, err := cmd.CombinedOutput(); err != nil {
		b.Fatalf("backup client: %v\n%s", err, out)
	}
	return time.Since(start)
}

// The test binary started with these set is BenchmarkLifecycle's backup
// client, not a test run.
const (
	backupClientEnv = "LIFECYCLE_BACKUP_ADDR"
	backupOutEnv    = "LIFECYCLE_BACKUP_OUT"
)

func TestMain(m *testing.M) {
	if addr := os.Getenv(backupClientEnv); addr != "" {
		if err := backupClient(addr, os.Getenv(backupOutEnv)); err != nil {
			fmt.Fprintln(os.Stderr, err)
			os.Exit(1)
		}
		os.Exit(0)
	}
	os.Exit(m.Run())
}

// backupClient writes a backup of the server at addr to out.
func backupClient(addr, out string) error {
	cc, err := grpc.NewClient(addr, grpc.WithTransportCredentials(insecure.NewCredentials()),
		grpc.WithDefaultCallOptions(grpc.MaxCallRecvMsgSize(16<<20)))
	if err != nil {
		return err
	}
	defer cc.Close()
	w, err := bolt.CreateBackup(out)
	if err != nil {
		return err
	}
	defer w.Abort()
	stream, err := adminv1.NewAdminBrokerClient(cc).Backup(context.Background(), &adminv1.BackupRequest{})
	if err != nil {
		return err
	}
	for {
		msg, err := stream.Recv()
		if errors.Is(err, io.EOF) {
			break
		}
		if err != nil {
			return err
		}
		if h := msg.GetHeader(); h != nil {
			if err := w.SetMeta(h.GetMeta()); err != nil {
				return err
			}
		}
		for _, r := range msg.GetRecords() {
			if err := w.Add(storage.Record{Name: r.GetName(), Connection: r.GetConnection(), Tokens: r.GetTokens()}); err != nil {
				return err
			}
		}
	}
	_, err = w.Finish()
	return err
}

// trafficRatio returns cached GetAccessToken calls per second without and
// with a backup running, and their ratio. Each of 5 rounds measures a
// window during one whole backup between two windows as long without, so
// that the load of anything else on the machine, which drifts over
// seconds, weighs on both sides alike; the figures are the rounds'
// medians.
func trafficRatio(b *testing.B, env *benchEnv, n int, dir string) (plain, during, ratio float64) {
	took := benchBackup(b, env.addr, dir) // the windows' length
	idle := func() { time.Sleep(took) }
	var without, with, ratios []float64
	for range 5 {
		before := callsWhile(b, env.client, n, idle)
		busy := callsWhile(b, env.client, n, func() { took = benchBackup(b, env.addr, dir) })
		after := callsWhile(b, env.client, n, idle)
		without = append(without, (before+after)/2)
		with = append(with, busy)
		ratios = append(ratios, busy/((before+after)/2))
	}
	return medianOf(without), medianOf(with), medianOf(ratios)
}

// callsWhile calls GetAccessToken over the n connections from 8
// goroutines while during runs, and returns the calls per second.
func callsWhile(b *testing.B, c pb.TokenBrokerClient, n int, during func()) float64 {
	var calls atomic.Int64
	stop := make(chan struct{})
	var wg sync.WaitGroup
	for g := range 8 {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for i := g * 7919; ; i += 8 {
				select {
				case <-stop:
					return
				default:
				}
				if _, err := c.GetAccessToken(context.Background(), &pb.GetAccessTokenRequest{Name: benchName(i % n)}); err != nil {
					b.Error(err)
					return
				}
				calls.Add(1)
			}
		}()
	}
	start := time.Now()
	during()
	elapsed := time.Since(start)
	close(stop)
	wg.Wait()
	return float64(calls.Load()) / elapsed.Seconds()
}

// benchRekey runs one Rekey call and returns how many values it resealed.
func benchRekey(b *testing.B, admin adminv1.AdminBrokerClient) int64 {
	stream, err := admin.Rekey(context.Background(), &adminv1.RekeyRequest{})
	if err != nil {
		b.Fatal(err)
	}
	for {
		msg, err := stream.Recv()
		if err != nil {
			b.Fatal(err)
		}
		if msg.GetDone() {
			if msg.GetRemaining() != 0 {
				b.Fatalf("%d records still need the old key", msg.GetRemaining())
			}
			return msg.GetResealed()
		}
	}
}

func median(k int, f func() float64) float64 {
	var v []float64
	for range k {
		v = append(v, f())
	}
	return medianOf(v)
}

func medianOf(v []float64) float64 {
	slices.Sort(v)
	return v[len(v)/2]
}
