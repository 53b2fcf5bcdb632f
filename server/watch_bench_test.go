package server_test

import (
	"context"
	"io"
	"log/slog"
	"net"
	"net/http/httptest"
	"path/filepath"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials/insecure"
	"google.golang.org/protobuf/types/known/timestamppb"

	pb "tokenbroker/gen/tokenbroker/v1"

	"tokenbroker/broker"
	"tokenbroker/broker/acumaticatest"
	"tokenbroker/server"
	"tokenbroker/storage"
	"tokenbroker/storage/bolt"
)

// parkMethod is the baseline of BenchmarkWatchFanOut: a server-streaming
// RPC on the same server stack that sends one message at once, then parks
// each stream on a channel and, when it is closed, sends one message of the
// same shape as a WatchAccessTokenResponse. It is what any push fan-out
// costs over gRPC with no broker behind it.
const parkMethod = "/tokenbroker.bench.Park/Watch"

// parking is the baseline's wake-up: closing the current channel wakes every
// parked stream.
type parking struct {
	ch  atomic.Pointer[chan struct{}]
	msg *pb.WatchAccessTokenResponse
}

func (p *parking) wake() {
	next := make(chan struct{})
	old := p.ch.Swap(&next)
	close(*old)
}

func registerPark(s *grpc.Server, p *parking) {
	s.RegisterService(&grpc.ServiceDesc{
		ServiceName: "tokenbroker.bench.Park",
		HandlerType: (*any)(nil),
		Streams: []grpc.StreamDesc{{
			StreamName:    "Watch",
			ServerStreams: true,
			Handler: func(_ any, ss grpc.ServerStream) error {
				if err := ss.RecvMsg(new(pb.WatchAccessTokenRequest)); err != nil {
					return err
				}
				for {
					ch := *p.ch.Load()
					if err := ss.SendMsg(p.msg); err != nil {
						return err
					}
					select {
					case <-ch:
					case <-ss.Context().Done():
						return ss.Context().Err()
					}
				}
			},
		}},
	}, struct{}{})
}

// herd is n streams whose receivers count messages; the one that brings
// the count to target reports the time.
type herd struct {
	count  atomic.Int64
	target atomic.Int64
	last   chan time.Time
}

func (h *herd) receive(recv func() error) {
	for recv() == nil {
		if h.count.Add(1) == h.target.Load() {
			h.last <- time.Now()
		}
	}
}

// expect arms the herd for one message on each of its n streams.
func (h *herd) expect(n int) { h.target.Store(h.count.Load() + int64(n)) }

// BenchmarkWatchFanOut pushes one rotation to 10,000 open WatchAccessToken
// streams and measures the time from the commit (a watcher inside the
// broker wakes) until the last stream has the token, against the parked
// baseline: as many streams on the same server, woken by closing a channel,
// each sending one message of the same shape. Both herds are open at once
// and take turns, so they share the machine's state; the ratio is the
// watch's cost over any fan-out's.
//
// "audited" is the service as it runs, an audit line per token sent;
// "unaudited" runs without an Auditor and shows what the line costs.
func BenchmarkWatchFanOut(b *testing.B) {
	b.Run("audited", func(b *testing.B) { benchmarkFanOut(b, true) })
	b.Run("unaudited", func(b *testing.B) { benchmarkFanOut(b, false) })
}

func benchmarkFanOut(b *testing.B, audited bool) {
	const streams, conns = 10000, 20
	idp := acumaticatest.New(acumaticatest.Options{})
	idp.AddClient(clientID, clientSecret)
	idp.AddUser(username, password)
	hs := httptest.NewServer(idp.Handler())
	defer hs.Close()
	keys, _ := storage.NewKeyring(make([]byte, 32))
	st, err := bolt.Open(filepath.Join(b.TempDir(), "tokenbroker.db"), bolt.Options{Keyring: keys})
	if err != nil {
		b.Fatal(err)
	}
	defer st.Close()
	br, err := broker.New(broker.Options{Store: st, TickInterval: -1, RejectCooldown: -1, AllowUpstreamCIDRs: loopback})
	if err != nil {
		b.Fatal(err)
	}
	defer br.Close()
	const name = "tenants/acme/connections/erp"
	if _, err := br.CreateConnection(context.Background(), &storage.Connection{
		Name: name, InstanceURL: hs.URL, ClientID: clientID, ClientSecret: clientSecret, Username: username, Password: password,
	}, false); err != nil {
		b.Fatal(err)
	}
	first, err := br.GetAccessToken(context.Background(), name, time.Minute, "")
	if err != nil {
		b.Fatal(err)
	}
	opts := server.Options{Broker: br, Logger: slog.New(slog.DiscardHandler), Metrics: server.NewMetrics(), AllowUpstreamCIDRs: loopback}
	if audited {
		opts.Auditor = server.NewAuditor(io.Discard)
		defer opts.Auditor.Close()
	}
	srv := server.New(opts)
	park := &parking{msg: &pb.WatchAccessTokenResponse{
		AccessToken: strings.Repeat("x", len(first.AccessToken)), TokenType: "Bearer",
		ExpireTime: timestamppb.New(first.ExpireTime), InstanceUrl: first.InstanceURL, Scopes: first.Scopes,
	}}
	ch := make(chan struct{})
	park.ch.Store(&ch)
	registerPark(srv.Server, park)
	lis, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		b.Fatal(err)
	}
	go srv.Serve(lis)
	defer srv.Stop()

	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	watch, parked := &herd{last: make(chan time.Time, 1)}, &herd{last: make(chan time.Time, 1)}
	watch.expect(streams)
	parked.expect(streams)
	for range conns {
		cc, err := grpc.NewClient(lis.Addr().String(), grpc.WithTransportCredentials(insecure.NewCredentials()))
		if err != nil {
			b.Fatal(err)
		}
		defer cc.Close()
		api := pb.NewTokenBrokerClient(cc)
		for range streams / conns {
			ws, err := api.WatchAccessToken(ctx, &pb.WatchAccessTokenRequest{Name: name})
			if err != nil {
				b.Fatal(err)
			}
			go watch.receive(func() error { _, err := ws.Recv(); return err })
			ps, err := cc.NewStream(ctx, &grpc.StreamDesc{ServerStreams: true}, parkMethod)
			if err != nil {
				b.Fatal(err)
			}
			if err := ps.SendMsg(&pb.WatchAccessTokenRequest{Name: name}); err != nil {
				b.Fatal(err)
			}
			ps.CloseSend()
			go parked.receive(func() error { return ps.RecvMsg(new(pb.WatchAccessTokenResponse)) })
		}
	}
	// Every stream has its first message: the herds are parked.
	<-watch.last
	<-parked.last

	// The sentinel is a watcher inside the broker: it wakes at the commit.
	sentinel, err := br.WatchToken(name, time.Minute)
	if err != nil {
		b.Fatal(err)
	}
	cur, err := sentinel.Next(ctx)
	if err != nil {
		b.Fatal(err)
	}
	var watchTotal, parkTotal time.Duration
	b.ResetTimer()
	rotate := func() time.Duration {
		watch.expect(streams)
		committed := make(chan time.Time, 1)
		go func() {
			tok, err := sentinel.Next(ctx)
			if err != nil {
				b.Error(err)
			}
			cur = tok
			committed <- time.Now()
		}()
		if _, err := br.GetAccessToken(ctx, name, time.Minute, cur.AccessToken); err != nil {
			b.Fatal(err)
		}
		start := <-committed
		return (<-watch.last).Sub(start)
	}
	wake := func() time.Duration {
		parked.expect(streams)
		start := time.Now()
		park.wake()
		return (<-parked.last).Sub(start)
	}
	for i := range b.N {
		// Take turns, and change who goes first, so that neither herd
		// always runs right after the other's garbage.
		if i%2 == 0 {
			watchTotal += rotate()
			parkTotal += wake()
		} else {
			parkTotal += wake()
			watchTotal += rotate()
		}
	}
	b.StopTimer()
	n := float64(b.N)
	b.ReportMetric(watchTotal.Seconds()*1000/n, "watch-ms/rotation")
	b.ReportMetric(parkTotal.Seconds()*1000/n, "parked-ms/wake")
	b.ReportMetric(watchTotal.Seconds()/parkTotal.Seconds(), "ratio")
}
