package broker

import (
	"context"
	"errors"
	"fmt"
	"net"
	"net/http"
	"net/netip"
	"net/url"
	"strings"
	"syscall"
	"time"
)

// UpstreamRules say which addresses the broker may send requests to. An
// instance URL is the operator's input, and every request to it carries
// credentials; without rules a tenant's operator could make the broker post
// them to (or probe) services inside the network: a cloud metadata
// endpoint, a database on localhost, a private admin interface. So
// addresses inside the network are refused unless allowed here.
type UpstreamRules struct {
	// AllowInsecure allows http:// instance URLs beyond loopback and
	// loopback addresses (the stand-ins of tests).
	AllowInsecure bool
	// AllowCIDRs are address ranges allowed although inside the network,
	// e.g. 10.0.0.0/8 for an Acumatica server on the private network.
	AllowCIDRs []netip.Prefix
}

func (o *Options) upstreamRules() UpstreamRules {
	return UpstreamRules{AllowInsecure: o.AllowInsecureUpstream, AllowCIDRs: o.AllowUpstreamCIDRs}
}

// ErrAddressRefused marks an upstream address the [UpstreamRules] refuse:
// an operator must allow its range or change the instance URL. A refresh
// that meets it answers it with reason UPSTREAM_ADDRESS_REFUSED and is not
// retried.
var ErrAddressRefused = errors.New("broker: upstream address refused")

// addressError is a refused address and why.
type addressError struct {
	addr string
	why  string
}

func (e *addressError) Error() string {
	return fmt.Sprintf("upstream address %s refused: it is %s; allow its range with --allow-upstream-cidr", e.addr, e.why)
}

func (e *addressError) Is(target error) bool { return target == ErrAddressRefused }

// refusedAddress describes the refused address in err, if any.
func refusedAddress(err error) (string, bool) {
	var ae *addressError
	if errors.As(err, &ae) {
		return ae.Error(), true
	}
	return "", false
}

// refusedRanges are the ranges upstream requests may not reach by default,
// with why. Loopback is judged apart.
var refusedRanges = []struct {
	prefix netip.Prefix
	why    string
}{
	{netip.MustParsePrefix("0.0.0.0/8"), "the unspecified network"},
	{netip.MustParsePrefix("10.0.0.0/8"), "private"},
	{netip.MustParsePrefix("100.64.0.0/10"), "carrier-grade NAT (shared, internal)"},
	{netip.MustParsePrefix("169.254.0.0/16"), "link-local (cloud metadata lives here)"},
	{netip.MustParsePrefix("172.16.0.0/12"), "private"},
	{netip.MustParsePrefix("192.0.0.0/24"), "IETF protocol assignments"},
	{netip.MustParsePrefix("192.168.0.0/16"), "private"},
	{netip.MustParsePrefix("198.18.0.0/15"), "benchmarking"},
	{netip.MustParsePrefix("224.0.0.0/4"), "multicast"},
	{netip.MustParsePrefix("240.0.0.0/4"), "reserved (and broadcast)"},
	{netip.MustParsePrefix("::/128"), "unspecified"},
	{netip.MustParsePrefix("fc00::/7"), "unique local (private)"},
	{netip.MustParsePrefix("fe80::/10"), "link-local"},
	{netip.MustParsePrefix("fec0::/10"), "site-local"},
	{netip.MustParsePrefix("ff00::/8"), "multicast"},
}

// nat64 embeds an IPv4 address in its last 32 bits.
var nat64 = netip.MustParsePrefix("64:ff9b::/96")

// checkAddr returns an error wrapping [ErrAddressRefused] if upstream
// requests may not reach ip.
func (r UpstreamRules) checkAddr(ip netip.Addr) error {
	ip = ip.Unmap().WithZone("")
	if nat64.Contains(ip) {
		b := ip.As16()
		if err := r.checkAddr(netip.AddrFrom4([4]byte(b[12:]))); err != nil {
			return err
		}
	}
	for _, p := range r.AllowCIDRs {
		if p.Contains(ip) {
			return nil
		}
	}
	if ip.IsLoopback() {
		if r.AllowInsecure {
			return nil
		}
		return &addressError{addr: ip.String(), why: "loopback"}
	}
	for _, rr := range refusedRanges {
		if rr.prefix.Contains(ip) {
			return &addressError{addr: ip.String(), why: rr.why}
		}
	}
	return nil
}

// checkHost judges an instance URL's host at input: literal addresses and
// localhost names are checked without any lookup; other names are checked
// at connect time, on the addresses they resolve to.
func (r UpstreamRules) checkHost(host string) error {
	if isLocalhostName(host) {
		// Judged as the loopback address it names.
		return r.checkAddr(netip.AddrFrom4([4]byte{127, 0, 0, 1}))
	}
	ip, err := netip.ParseAddr(host)
	if err != nil {
		return nil
	}
	return r.checkAddr(ip)
}

// isLocalhostName reports whether host is localhost or a name under it,
// which resolve to loopback (RFC 6761).
func isLocalhostName(host string) bool {
	h := strings.ToLower(strings.TrimSuffix(host, "."))
	return h == "localhost" || strings.HasSuffix(h, ".localhost")
}

// CheckInstanceAddress judges a normalized instance URL's host under r;
// the message says how to allow it.
func CheckInstanceAddress(instanceURL string, r UpstreamRules) error {
	u, err := url.Parse(instanceURL)
	if err != nil {
		return errors.New("must be a URL such as https://mycompany.acumatica.com")
	}
	if err := r.checkHost(u.Hostname()); err != nil {
		var ae *addressError
		errors.As(err, &ae)
		return fmt.Errorf("points inside the network (%s is %s): refused unless an operator allows the range with --allow-upstream-cidr", ae.addr, ae.why)
	}
	return nil
}

// control refuses, after name resolution and before connecting, an
// address the rules do not allow: a name that resolves inside the network
// (or is rebound to it after it was checked) is caught here.
func (r UpstreamRules) control(_, address string, _ syscall.RawConn) error {
	ap, err := netip.ParseAddrPort(address)
	if err != nil {
		return &addressError{addr: address, why: "not an IP address and port"}
	}
	return r.checkAddr(ap.Addr())
}

// guardTransport returns the transport upstream requests go through, with
// every connection's address checked against r. The default is a clone of
// http.DefaultTransport. A given *http.Transport is cloned and guarded the
// same way (its own DialContext, if any, is checked on the address it
// reached). Any other RoundTripper is used as it is and must guard itself.
// Through a proxy (HTTPS_PROXY), the address checked is the proxy's: the
// names behind it are judged at input only.
func guardTransport(rt http.RoundTripper, r UpstreamRules) http.RoundTripper {
	if rt == nil {
		rt = http.DefaultTransport
	}
	t, ok := rt.(*http.Transport)
	if !ok {
		return rt
	}
	t = t.Clone()
	if inner := t.DialContext; inner != nil && rt != http.DefaultTransport {
		// A dialer of the caller's: judge where it connected.
		t.DialContext = func(ctx context.Context, network, addr string) (net.Conn, error) {
			conn, err := inner(ctx, network, addr)
			if err != nil {
				return nil, err
			}
			if err := r.control(network, conn.RemoteAddr().String(), nil); err != nil {
				conn.Close()
				return nil, err
			}
			return conn, nil
		}
		return t
	}
	// Judge each resolved address before connecting to it.
	dialer := &net.Dialer{Timeout: 30 * time.Second, KeepAlive: 30 * time.Second, Control: r.control}
	t.DialContext = dialer.DialContext
	return t
}
