package server_test

import (
	"bytes"
	"context"
	"net"
	"net/netip"
	"path/filepath"
	"slices"
	"strings"
	"testing"

	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/credentials/insecure"
	"google.golang.org/grpc/status"

	pb "tokenbroker/gen/tokenbroker/v1"

	"tokenbroker/broker"
	"tokenbroker/server"
	"tokenbroker/storage"
	"tokenbroker/storage/bolt"
)

// serveWithRules runs a broker and gRPC server on loopback whose upstream
// rules allow the given ranges (and loopback only if insecure), and returns
// a client.
func serveWithRules(t *testing.T, insecureUpstream bool, allow ...string) pb.TokenBrokerClient {
	t.Helper()
	var cidrs []netip.Prefix
	for _, a := range allow {
		cidrs = append(cidrs, netip.MustParsePrefix(a))
	}
	keys, _ := storage.NewKeyring(bytes.Repeat([]byte{7}, 32))
	st, err := bolt.Open(filepath.Join(t.TempDir(), "tokenbroker.db"), bolt.Options{Keyring: keys})
	if err != nil {
		t.Fatal(err)
	}
	b, err := broker.New(broker.Options{Store: st, TickInterval: -1, AllowInsecureUpstream: insecureUpstream, AllowUpstreamCIDRs: cidrs})
	if err != nil {
		t.Fatal(err)
	}
	srv := server.New(server.Options{Broker: b, AllowInsecureUpstream: insecureUpstream, AllowUpstreamCIDRs: cidrs})
	lis, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	go srv.Serve(lis)
	cc, err := grpc.NewClient(lis.Addr().String(), grpc.WithTransportCredentials(insecure.NewCredentials()))
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		cc.Close()
		srv.Stop()
		b.Close()
		st.Close()
	})
	return pb.NewTokenBrokerClient(cc)
}

// Instance URLs whose literal address (or localhost name) lies inside the
// network are refused at input with INVALID_ARGUMENT on instance_url. Every
// call is validate_only, so even a broker that let one through would
// send nothing anywhere.
func TestInstanceURLsInsideTheNetworkAreRefused(t *testing.T) {
	create := func(c pb.TokenBrokerClient, instance string) error {
		_, err := c.CreateConnection(context.Background(), &pb.CreateConnectionRequest{
			Parent: "tenants/acme", ConnectionId: "erp", ValidateOnly: true,
			Connection: &pb.Connection{InstanceUrl: instance, ClientId: clientID, ClientSecret: clientSecret, Username: username, Password: password},
		})
		return err
	}
	refused := func(t *testing.T, c pb.TokenBrokerClient, instance, why string) {
		t.Helper()
		err := create(c, instance)
		if status.Code(err) != codes.InvalidArgument || !slices.Equal(violationFields(err), []string{"connection.instance_url"}) {
			t.Errorf("%s: %v, want INVALID_ARGUMENT on connection.instance_url", instance, err)
		} else if !strings.Contains(err.Error(), why) || !strings.Contains(err.Error(), "--allow-upstream-cidr") {
			t.Errorf("%s: %v, want the reason %q and how to allow it", instance, err, why)
		}
	}
	byDefault := serveWithRules(t, false)
	for _, tc := range []struct{ url, why string }{
		{"https://169.254.169.254", "link-local"},
		{"https://169.254.169.254/latest/meta-data", "link-local"},
		{"https://[fd00:ec2::254]", "unique local"},
		{"https://10.0.0.5", "private"},
		{"https://172.16.3.4:8443", "private"},
		{"https://192.168.1.10", "private"},
		{"https://[fd00::1]", "unique local"},
		{"https://[fe80::1]", "link-local"},
		{"https://100.100.100.200", "carrier-grade NAT"},
		{"https://localhost:6379", "loopback"},
		{"https://db.localhost", "loopback"},
		{"https://127.0.0.1:6379", "loopback"},
		{"https://[::1]", "loopback"},
		{"https://0.0.0.0", "unspecified"},
		{"https://[::]", "unspecified"},
		{"https://224.0.0.1", "multicast"},
		{"https://[ff02::1]", "multicast"},
		{"https://255.255.255.255", "broadcast"},
		{"https://[::ffff:10.0.0.5]", "private"},
		{"https://[::ffff:169.254.169.254]", "link-local"},
		{"https://[64:ff9b::a9fe:a9fe]", "link-local"},
	} {
		refused(t, byDefault, tc.url, tc.why)
	}
	if err := create(byDefault, "https://203.0.113.10"); err != nil {
		t.Errorf("a public address: %v", err)
	}

	allowTen := serveWithRules(t, false, "10.0.0.0/8")
	if err := create(allowTen, "https://10.0.0.5"); err != nil {
		t.Errorf("10.0.0.5 under --allow-upstream-cidr 10.0.0.0/8: %v", err)
	}
	refused(t, allowTen, "https://169.254.169.254", "link-local")
	refused(t, allowTen, "https://192.168.1.10", "private")
	refused(t, allowTen, "https://127.0.0.1", "loopback")

	insecureSwitch := serveWithRules(t, true)
	if err := create(insecureSwitch, "http://127.0.0.1:8081"); err != nil {
		t.Errorf("loopback under the insecure-upstream switch: %v", err)
	}
	refused(t, insecureSwitch, "https://169.254.169.254", "link-local")
}
