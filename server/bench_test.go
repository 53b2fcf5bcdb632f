package server_test

import (
	"context"
	"io"
	"log/slog"
	"net"
	"net/http/httptest"
	"path/filepath"
	"testing"

	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials/insecure"

	pb "tokenbroker/gen/tokenbroker/v1"

	"tokenbroker/broker"
	"tokenbroker/broker/acumaticatest"
	"tokenbroker/server"
	"tokenbroker/server/servertest"
	"tokenbroker/storage"
	"tokenbroker/storage/bolt"
)

// BenchmarkRPC compares cached GetAccessToken with a no-op RPC on the same
// server stack (loopback listener, every interceptor as in production).
// Read the two results as a ratio: go test -run '^$' -bench RPC ./server/
func BenchmarkRPC(b *testing.B) {
	idp := acumaticatest.New(acumaticatest.Options{})
	idp.AddClient(clientID, clientSecret)
	idp.AddUser(username, password)
	hs := httptest.NewServer(idp.Handler())
	defer hs.Close()
	keys, _ := storage.NewKeyring(make([]byte, 32))
	st, err := bolt.Open(filepath.Join(b.TempDir(), "db"), bolt.Options{Keyring: keys})
	if err != nil {
		b.Fatal(err)
	}
	defer st.Close()
	metrics := server.NewMetrics()
	br, _ := broker.New(broker.Options{Store: st, TickInterval: -1, Observer: metrics, AllowUpstreamCIDRs: loopback})
	defer br.Close()
	auditor := server.NewAuditor(io.Discard)
	defer auditor.Close()
	srv := server.New(server.Options{Broker: br, Logger: slog.New(slog.NewJSONHandler(io.Discard, nil)), AllowUpstreamCIDRs: loopback, Auditor: auditor, Metrics: metrics, QuietMethods: servertest.QuietMethods})
	servertest.RegisterNoop(srv.Server)
	lis, _ := net.Listen("tcp", "127.0.0.1:0")
	go srv.Serve(lis)
	defer srv.Stop()
	cc, err := grpc.NewClient(lis.Addr().String(), grpc.WithTransportCredentials(insecure.NewCredentials()))
	if err != nil {
		b.Fatal(err)
	}
	defer cc.Close()
	client := pb.NewTokenBrokerClient(cc)
	ctx := context.Background()
	if _, err := client.CreateConnection(ctx, &pb.CreateConnectionRequest{Parent: "tenants/acme", ConnectionId: "erp", Connection: &pb.Connection{
		InstanceUrl: hs.URL, ClientId: clientID, ClientSecret: clientSecret, Username: username, Password: password,
	}}); err != nil {
		b.Fatal(err)
	}
	req := &pb.GetAccessTokenRequest{Name: "tenants/acme/connections/erp"}
	for _, mode := range []string{"noop", "cached"} {
		b.Run(mode, func(b *testing.B) {
			b.ReportAllocs()
			b.RunParallel(func(pb *testing.PB) {
				for pb.Next() {
					var err error
					if mode == "noop" {
						err = servertest.CallNoop(ctx, cc)
					} else {
						_, err = client.GetAccessToken(ctx, req)
					}
					if err != nil {
						b.Error(err)
						return
					}
				}
			})
		})
	}
}
