package broker_test

import (
	"context"
	"errors"
	"net/netip"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	"tokenbroker/broker"
	"tokenbroker/broker/acumaticatest"
)

// A connection whose instance URL names a host that resolves inside the
// network (here localhost, stored while loopback was allowed) gets no
// request through once the broker refuses loopback: not the token request,
// discovery, the TestConnection probe, revocation or logout. The check is
// made on the resolved address when connecting, so a name rebound to an
// internal address after input is caught too. Nothing leaves loopback.
func TestAddressesInsideTheNetworkAreRefusedWhenConnecting(t *testing.T) {
	e := newEnv(t)
	ctx := context.Background()
	c := e.conn()
	c.InstanceURL = strings.Replace(e.http.URL, "127.0.0.1", "localhost", 1)
	if !strings.Contains(c.InstanceURL, "://localhost:") {
		t.Fatalf("stand-in URL %q is not on 127.0.0.1", e.http.URL)
	}
	if _, err := e.b.CreateConnection(ctx, c, false); err != nil {
		t.Fatal(err)
	}
	tok := e.mustToken()
	e.b.Close()
	e.opts.AllowInsecureUpstream = false
	e.b = e.newBroker()
	before := e.idp.Counts()

	res, err := e.b.TestConnection(ctx, connName, []string{"SalesOrder"}, "")
	if err != nil {
		t.Fatalf("TestConnection with a fresh cached token: %v", err)
	}
	if got := res.Entities[0]; got.Outcome != broker.OutcomeError || !strings.Contains(got.Message, "refused") || !strings.Contains(got.Message, "loopback") {
		t.Errorf("probe = %+v, want refused as loopback", got)
	}
	_, err = e.b.GetAccessToken(ctx, connName, time.Minute, tok.AccessToken)
	if err == nil || !strings.Contains(err.Error(), "refused: it is loopback") || !strings.Contains(err.Error(), "--allow-upstream-cidr") {
		t.Errorf("refresh after a rejected token: %v, want the address refused, saying how to allow it", err)
	}
	if err := e.b.DeleteConnection(ctx, connName, ""); err != nil {
		t.Fatalf("DeleteConnection: %v", err)
	}
	if after := e.idp.Counts(); after != before {
		t.Errorf("requests reached the refused address: %+v -> %+v", before, after)
	}
}

// The operators' allow-list lets instance URLs reach the ranges it names,
// at input and when connecting; other ranges stay refused.
func TestAllowedRangesAreReachable(t *testing.T) {
	t.Run("loopback allowed by range", func(t *testing.T) {
		e := newEnv(t, func(_ *acumaticatest.Options, o *broker.Options) {
			o.AllowInsecureUpstream = false
			o.AllowUpstreamCIDRs = []netip.Prefix{netip.MustParsePrefix("127.0.0.0/8")}
		})
		e.create()
		if tok := e.mustToken(); tok.AccessToken == "" {
			t.Error("no token")
		}
	})
	t.Run("another range allowed", func(t *testing.T) {
		e := newEnv(t, func(_ *acumaticatest.Options, o *broker.Options) {
			o.AllowInsecureUpstream = false
			o.AllowUpstreamCIDRs = []netip.Prefix{netip.MustParsePrefix("10.0.0.0/8")}
		})
		_, err := e.b.CreateConnection(context.Background(), e.conn(), false)
		var be *broker.Error
		if !errors.As(err, &be) || !errors.Is(err, broker.ErrInvalidArgument) || len(be.Violations) != 1 || be.Violations[0].Field != "instance_url" {
			t.Fatalf("CreateConnection on loopback = %v, want instance_url refused", err)
		}
		if n := e.idp.Counts().PasswordGrants; n != 0 {
			t.Errorf("%d password grants sent to a refused address", n)
		}
	})
}

// TestRefusedAddressIsNotRetried: an address refused when connecting is an
// operator's matter (allow its range, or fix the instance URL), not an
// outage: the refresh fails at once with UPSTREAM_ADDRESS_REFUSED, no retry
// within it and no password grant, and callers meanwhile get the same
// error without another dial.
func TestRefusedAddressIsNotRetried(t *testing.T) {
	var sleeps atomic.Int32
	e := newEnv(t, func(_ *acumaticatest.Options, o *broker.Options) {
		o.MaxAttempts = 4
		o.Sleep = func(context.Context, time.Duration) error { sleeps.Add(1); return nil }
	})
	ctx := context.Background()
	c := e.conn()
	c.InstanceURL = strings.Replace(e.http.URL, "127.0.0.1", "localhost", 1)
	if _, err := e.b.CreateConnection(ctx, c, false); err != nil {
		t.Fatal(err)
	}
	tok := e.mustToken()
	e.b.Close()
	e.opts.AllowInsecureUpstream = false
	e.b = e.newBroker()

	for i := range 3 {
		_, err := e.b.GetAccessToken(ctx, connName, time.Minute, tok.AccessToken)
		var be *broker.Error
		if !errors.Is(err, broker.ErrAddressRefused) || !errors.As(err, &be) || be.Reason != broker.ReasonUpstreamAddressRefused {
			t.Fatalf("call %d: err = %v, want ErrAddressRefused with reason %s", i, err, broker.ReasonUpstreamAddressRefused)
		}
	}
	if n := sleeps.Load(); n != 0 {
		t.Errorf("%d retries of a refused address", n)
	}
	if v := e.view(); v.Status.LastErrorCode != broker.ReasonUpstreamAddressRefused {
		t.Errorf("last error %s, want %s", v.Status.LastErrorCode, broker.ReasonUpstreamAddressRefused)
	}
}
