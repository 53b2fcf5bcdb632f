package server_test

import (
	"context"
	"crypto/tls"
	"crypto/x509"
	"net"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"

	pb "tokenbroker/gen/tokenbroker/v1"

	"tokenbroker/server"
	"tokenbroker/server/servertest"
)

func TestOversizedRequestRefused(t *testing.T) {
	f := newFixture(t)
	_, err := f.client.CreateConnection(context.Background(), &pb.CreateConnectionRequest{
		Parent: "tenants/acme", ConnectionId: "erp",
		Connection: &pb.Connection{DisplayName: strings.Repeat("x", 100<<10)},
	})
	if status.Code(err) != codes.ResourceExhausted {
		t.Errorf("100 KiB request: %v, want RESOURCE_EXHAUSTED", err)
	}
}

func TestTLSFilesReload(t *testing.T) {
	dir := t.TempDir()
	ca := servertest.NewCA(t, "ca")
	certPath, keyPath := servertest.WritePair(t, dir, "server", ca.Issue(t, servertest.Leaf{CN: "first", IPs: []net.IP{net.ParseIP("127.0.0.1")}, Server: true}))
	files, err := server.NewTLSFiles(certPath, keyPath, "")
	if err != nil {
		t.Fatal(err)
	}
	lis, err := tls.Listen("tcp", "127.0.0.1:0", files.Config())
	if err != nil {
		t.Fatal(err)
	}
	defer lis.Close()
	go func() {
		for {
			c, err := lis.Accept()
			if err != nil {
				return
			}
			go func() { c.(*tls.Conn).Handshake(); c.Close() }()
		}
	}()
	servedCN := func() string {
		pool := x509.NewCertPool()
		pool.AddCert(ca.Cert)
		c, err := tls.Dial("tcp", lis.Addr().String(), &tls.Config{RootCAs: pool})
		if err != nil {
			t.Fatal(err)
		}
		defer c.Close()
		return c.ConnectionState().PeerCertificates[0].Subject.CommonName
	}
	if got := servedCN(); got != "first" {
		t.Fatalf("served %q", got)
	}
	servertest.WritePair(t, dir, "server", ca.Issue(t, servertest.Leaf{CN: "second", IPs: []net.IP{net.ParseIP("127.0.0.1")}, Server: true}))
	if err := files.Reload(); err != nil {
		t.Fatal(err)
	}
	if got := servedCN(); got != "second" {
		t.Errorf("after reload served %q, want second", got)
	}
	// A broken file keeps the current certificate.
	os.WriteFile(filepath.Join(dir, "server.crt"), []byte("garbage"), 0o600)
	if err := files.Reload(); err == nil {
		t.Error("broken certificate accepted")
	}
	if got := servedCN(); got != "second" {
		t.Errorf("after failed reload served %q", got)
	}
}
