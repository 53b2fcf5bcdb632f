package client_test

import (
	"context"
	"net"
	"testing"

	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials/insecure"

	"tokenbroker/broker"
	"tokenbroker/broker/acumaticatest"
	"tokenbroker/client"
	"tokenbroker/server"
	"tokenbroker/storage"
	"tokenbroker/storage/etcd"
	"tokenbroker/storage/etcdtest"
)

// replicaServer is one broker replica on the shared etcd, served over gRPC
// on loopback; it returns the address.
func replicaServer(t *testing.T, endpoint string) (*broker.Broker, string) {
	t.Helper()
	keys, _ := storage.NewKeyring(make([]byte, 32))
	st, err := etcd.Open(context.Background(), etcd.Options{Client: etcdtest.Client(t, endpoint), Keyring: keys})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { st.Close() })
	b, err := broker.New(broker.Options{Store: st, Locker: st, Watcher: st, Authorizations: st, TickInterval: -1, AllowUpstreamCIDRs: loopback})
	if err != nil {
		t.Fatal(err)
	}
	if _, err := b.Load(context.Background()); err != nil {
		t.Fatal(err)
	}
	b.Start()
	t.Cleanup(b.Close)
	srv := server.New(server.Options{Broker: b, AllowUpstreamCIDRs: loopback})
	lis, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	go srv.Serve(lis)
	t.Cleanup(srv.Stop)
	return b, lis.Addr().String()
}

// TestTwoReplicasPushTheSameRotation: a client of each replica watches
// the same connection; a 401 reported through replica a rotates the token,
// and replica b's stream brings the same new token (seen through etcd) to
// its client without a call.
func TestTwoReplicasPushTheSameRotation(t *testing.T) {
	idp := acumaticatest.New(acumaticatest.Options{RevokeAccessOnRefresh: true})
	idp.AddClient(clientID, clientSecret)
	idp.AddUser(username, password)
	hs := idp.Start()
	defer hs.Close()
	endpoint := etcdtest.Start(t)
	a, addrA := replicaServer(t, endpoint)
	b, addrB := replicaServer(t, endpoint)
	if _, err := a.CreateConnection(context.Background(), &storage.Connection{
		Name: erp, InstanceURL: hs.URL, ClientID: clientID, ClientSecret: clientSecret, Username: username, Password: password,
	}, false); err != nil {
		t.Fatal(err)
	}
	eventually(t, "replica b to see the connection", func() bool {
		_, err := b.GetConnection(context.Background(), erp)
		return err == nil
	})
	dial := func(addr string) *client.Client {
		cc, err := grpc.NewClient(addr, grpc.WithTransportCredentials(insecure.NewCredentials()))
		if err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { cc.Close() })
		c := client.New(cc)
		t.Cleanup(func() { c.Close() })
		return c
	}
	ca, cb := dial(addrA), dial(addrB)
	tsA, tsB := ca.TokenSource(erp), cb.TokenSource(erp)
	first, err := tsA.Token()
	if err != nil {
		t.Fatal(err)
	}
	if tokB, err := tsB.Token(); err != nil || tokB.AccessToken != first.AccessToken {
		t.Fatalf("replica b serves another token at the start (%v)", err)
	}
	// The token dies behind the broker's back; a request through replica a
	// reports it, and a's refresh is committed to etcd.
	idp.RevokeRefreshTokens()
	resp, err := ca.HTTPClient(erp).Get(hs.URL + "/entity/Default/24.200.001/SalesOrder?$top=1")
	if err != nil {
		t.Fatal(err)
	}
	resp.Body.Close()
	if resp.StatusCode != 200 {
		t.Fatalf("request through replica a: %d", resp.StatusCode)
	}
	rotated, err := tsA.Token()
	if err != nil || rotated.AccessToken == first.AccessToken {
		t.Fatalf("replica a's client did not take the rotated token (%v)", err)
	}
	// b's cached token is still valid for the margin, so its Token makes no
	// call: only the stream can change what it returns.
	eventually(t, "replica b's stream to bring the rotated token", func() bool {
		tok, err := tsB.Token()
		return err == nil && tok.AccessToken == rotated.AccessToken
	})
	if got := idp.Counts().PasswordGrants; got != 2 {
		t.Errorf("password grants = %d, want 2 (the create, and one sign-in after the session ended)", got)
	}
}
