package broker_test

import (
	"fmt"
	"net/url"
	"strings"
	"testing"

	"tokenbroker/broker"
)

func FuzzParseConnectionName(f *testing.F) {
	for _, s := range []string{"tenants/acme/connections/erp", "tenants/-/connections/x", "tenants/a/connections/", "tenants//connections/x", "x"} {
		f.Add(s)
	}
	f.Fuzz(func(t *testing.T, name string) {
		tenant, conn, err := broker.ParseConnectionName(name)
		if err != nil {
			return
		}
		if got := broker.ConnectionName(tenant, conn); got != name {
			t.Errorf("round trip %q -> %q", name, got)
		}
		if !broker.ValidID(tenant) || !broker.ValidID(conn) {
			t.Errorf("accepted invalid ids in %q", name)
		}
	})
}

func FuzzNormalizeInstanceURL(f *testing.F) {
	for _, s := range []string{"mycompany.acumatica.com", "https://mycompany.acumatica.com/", "https://erp.example.com/AcumaticaERP",
		"http://127.0.0.1:8081", "https://u:p@x.com", "https://x.com/?q", "https://x.com/#f", "ftp://x", "://", "https://[::1]:8443/a",
		"https://x.com:", "https://x.com/a/%2e%2e/b", "https://x.com/%2E.", "https://x.com/a%2Fb", "https://x.com/a%00", "x.com/\x1b"} {
		f.Add(s)
	}
	f.Fuzz(func(t *testing.T, raw string) {
		got, err := broker.NormalizeInstanceURL(raw, false)
		if err != nil {
			return
		}
		u, perr := url.Parse(got)
		if perr != nil {
			t.Fatalf("normalized %q to unparsable %q", raw, got)
		}
		if u.Scheme != "https" && !(u.Scheme == "http" && (u.Hostname() == "localhost" || strings.HasPrefix(u.Hostname(), "127.") || u.Hostname() == "::1")) {
			t.Errorf("%q -> %q: insecure scheme accepted", raw, got)
		}
		if u.User != nil || u.RawQuery != "" || u.Fragment != "" || strings.HasSuffix(got, "/") || strings.HasSuffix(u.Host, ":") {
			t.Errorf("%q -> %q: not normalized", raw, got)
		}
		if broker.CheckText(got) != nil || broker.CheckText(u.Path) != nil {
			t.Errorf("%q -> %q: control characters or bad UTF-8 accepted", raw, got)
		}
		for _, seg := range strings.Split(u.EscapedPath(), "/")[1:] {
			if dec, err := url.PathUnescape(seg); err != nil || dec == "" || dec == "." || dec == ".." || strings.ContainsAny(dec, "/\\") {
				t.Errorf("%q -> %q: path segment %q accepted", raw, got, seg)
			}
		}
		again, err := broker.NormalizeInstanceURL(got, false)
		if err != nil || again != got {
			t.Errorf("not idempotent: %q -> %q -> %q (%v)", raw, got, again, err)
		}
	})
}

func FuzzValidateClientID(f *testing.F) {
	for _, s := range []string{"88358B02-A48D-A50E-F710-39C1636C30F6@MyTenant", "88358B02-A48D-A50E-F710-39C1636C30F6", "@", "x@y@z", "",
		"88358B02-A48D-A50E-F710-39C1636C30F6@T\x00", "88358B02-A48D-A50E-F710-39C1636C30F6@T\x1b[0m", "88358B02-A48D-A50E-F710-39C1636C30F6@T\u0085", "88358B02-A48D-A50E-F710-39C1636C30F6@\xff"} {
		f.Add(s)
	}
	f.Fuzz(func(t *testing.T, id string) {
		if err := broker.ValidateClientID(id); err == nil {
			guid, tenant, ok := strings.Cut(id, "@")
			if !ok || guid == "" || tenant == "" || strings.Contains(tenant, "@") || broker.CheckText(id) != nil {
				t.Errorf("accepted %q", id)
			}
		}
	})
}

func ExampleNormalizeInstanceURL() {
	for _, in := range []string{"mycompany.acumatica.com", "https://erp.example.com/AcumaticaERP/", "http://erp.example.com"} {
		out, err := broker.NormalizeInstanceURL(in, false)
		fmt.Printf("%s -> %q %v\n", in, out, err)
	}
	// Output:
	// mycompany.acumatica.com -> "https://mycompany.acumatica.com" <nil>
	// https://erp.example.com/AcumaticaERP/ -> "https://erp.example.com/AcumaticaERP" <nil>
	// http://erp.example.com -> "" http is allowed only for loopback hosts; use https
}

func ExampleValidateClientID() {
	fmt.Println(broker.ValidateClientID("88358B02-A48D-A50E-F710-39C1636C30F6"))
	// Output:
	// is missing the @Tenant suffix: copy the full Client ID from the Connected Application (SM303010), e.g. 88358B02-A48D-A50E-F710-39C1636C30F6@MyTenant
}
