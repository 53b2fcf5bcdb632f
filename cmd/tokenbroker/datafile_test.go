package main

import (
	"context"
	binenc "encoding/binary"
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"testing"

	bbolt "go.etcd.io/bbolt"
	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/credentials/insecure"
	healthpb "google.golang.org/grpc/health/grpc_health_v1"
	"google.golang.org/grpc/status"

	pb "tokenbroker/gen/tokenbroker/v1"
	"tokenbroker/internal/testkit"

	"tokenbroker/storage"
	"tokenbroker/storage/bolt"
)

// zeroKey is TOKENBROKER_KEY for an all-zero data key.
const zeroKey = "TOKENBROKER_KEY=" + "AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA="

// TestDamagedDataFileRefusedAtStart damages a page of a real data file: the
// binary exits non-zero with one line saying the file is corrupt and to
// restore it from a backup, without a panic, and the file is unchanged.
func TestDamagedDataFileRefusedAtStart(t *testing.T) {
	dir := filepath.Join(t.TempDir(), "data")
	if err := os.MkdirAll(dir, 0o700); err != nil {
		t.Fatal(err)
	}
	db := filepath.Join(dir, "tokenbroker.db")
	keys, err := storage.ParseKeys([]byte(strings.TrimPrefix(zeroKey, "TOKENBROKER_KEY=")))
	if err != nil {
		t.Fatal(err)
	}
	st, err := bolt.Open(db, bolt.Options{Keyring: keys})
	if err != nil {
		t.Fatal(err)
	}
	var wg sync.WaitGroup
	for i := range 300 {
		wg.Go(func() {
			if _, err := st.CreateConnection(context.Background(), &storage.Connection{
				Name: fmt.Sprintf("tenants/t%03d/connections/erp", i), InstanceURL: "https://erp.example.com",
				ClientID: clientID, ClientSecret: clientSecret, Username: username, Password: password,
			}, &storage.Tokens{RefreshToken: "rt", AccessToken: strings.Repeat("a", 900)}); err != nil {
				t.Error(err)
			}
		})
	}
	wg.Wait()
	st.Close()
	damageConnectionsRoot(t, db)
	before := testkit.FileSum(t, db)

	p := start(t, []string{zeroKey}, "--data-dir", dir, "--listen", "127.0.0.1:0")
	<-p.exited
	out := p.out.String()
	if p.err == nil {
		t.Fatalf("started on a damaged data file:\n%s", out)
	}
	if strings.Contains(out, "panic") || strings.Contains(out, "goroutine ") {
		t.Errorf("the damaged file made the binary panic:\n%s", out)
	}
	var said bool
	for _, line := range strings.Split(out, "\n") {
		said = said || strings.Contains(line, "data file is corrupt") && strings.Contains(line, "restore it from a backup") && strings.Contains(line, db)
	}
	if !said {
		t.Errorf("no line says the data file is corrupt and to restore it:\n%s", out)
	}
	if testkit.FileSum(t, db) != before {
		t.Error("the binary changed the damaged data file")
	}
}

// damageConnectionsRoot makes the root page of the connections bucket
// claim another page id, as a misdirected or torn write does.
func damageConnectionsRoot(t *testing.T, path string) {
	t.Helper()
	db, err := bbolt.Open(path, 0o600, &bbolt.Options{ReadOnly: true})
	if err != nil {
		t.Fatal(err)
	}
	var root uint64
	db.View(func(tx *bbolt.Tx) error {
		root = uint64(tx.Bucket([]byte("connections")).Root())
		return nil
	})
	size := db.Info().PageSize
	db.Close()
	f, err := os.OpenFile(path, os.O_RDWR, 0)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	if _, err := f.WriteAt(binenc.LittleEndian.AppendUint64(nil, root+1000), int64(root)*int64(size)); err != nil {
		t.Fatal(err)
	}
}

// TestDataFileDeletedWhileServing deletes the data file under a serving
// binary: health goes NOT_SERVING with an error log naming the file, and a
// create is refused with UNAVAILABLE instead of answering OK for a
// connection no restart would find.
func TestDataFileDeletedWhileServing(t *testing.T) {
	_, url := idp(t)
	dir := filepath.Join(t.TempDir(), "data")
	p := start(t, nil, "--data-dir", dir, "--listen", "127.0.0.1:0")
	c := p.client()
	cc, err := grpc.NewClient(p.addr, grpc.WithTransportCredentials(insecure.NewCredentials()))
	if err != nil {
		t.Fatal(err)
	}
	defer cc.Close()
	hc := healthpb.NewHealthClient(cc)
	ctx := context.Background()
	awaitHealth(t, hc, healthpb.HealthCheckResponse_SERVING)
	createConnection(t, c, "tenants/acme", url)

	db := filepath.Join(dir, "tokenbroker.db")
	if err := os.Remove(db); err != nil {
		t.Fatal(err)
	}
	awaitHealth(t, hc, healthpb.HealthCheckResponse_NOT_SERVING)
	if resp, err := hc.Check(ctx, &healthpb.HealthCheckRequest{Service: "tokenbroker.v1.TokenBroker"}); err != nil || resp.GetStatus() != healthpb.HealthCheckResponse_NOT_SERVING {
		t.Errorf("API service health: %v %v, want NOT_SERVING", resp.GetStatus(), err)
	}
	_, err = c.CreateConnection(ctx, &pb.CreateConnectionRequest{Parent: "tenants/beta", ConnectionId: "erp", Connection: &pb.Connection{
		InstanceUrl: url, ClientId: clientID, ClientSecret: clientSecret, Username: username, Password: password,
	}})
	if status.Code(err) != codes.Unavailable || !strings.Contains(err.Error(), "deleted or renamed") {
		t.Errorf("create after the data file was deleted: %v, want UNAVAILABLE saying it was deleted", err)
	}
	if out := p.out.String(); !strings.Contains(out, "NOT_SERVING") || !strings.Contains(out, db) {
		t.Errorf("no error log names the deleted file:\n%s", out)
	}
}

// awaitHealth waits until the server's overall health is want.
func awaitHealth(t *testing.T, hc healthpb.HealthClient, want healthpb.HealthCheckResponse_ServingStatus) {
	t.Helper()
	testkit.Eventually(t, "health "+want.String(), func() bool {
		resp, err := hc.Check(context.Background(), &healthpb.HealthCheckRequest{})
		return err == nil && resp.GetStatus() == want
	})
}
