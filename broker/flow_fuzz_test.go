package broker_test

import (
	"net/url"
	"strings"
	"testing"

	"tokenbroker/broker"
)

// FuzzValidateRedirectURI: an accepted redirect URI is an absolute https
// URL (http only on loopback) without fragment, user information, spaces
// or control characters.
func FuzzValidateRedirectURI(f *testing.F) {
	for _, s := range []string{"https://app.example.com/cb", "http://127.0.0.1:8765/callback", "http://localhost/cb",
		"http://app.example.com/cb", "https://app.example.com/cb#f", "https://u:p@app.example.com/cb", "/cb",
		"https://app.example.com/cb?x=1", "https://app.example.com/\x1b", "https:///cb", "mailto:x@y", "https://[::1]/cb"} {
		f.Add(s)
	}
	f.Fuzz(func(t *testing.T, raw string) {
		if broker.ValidateRedirectURI(raw) != nil {
			return
		}
		u, err := url.Parse(raw)
		if err != nil || !u.IsAbs() || u.Host == "" {
			t.Fatalf("accepted %q: not an absolute URL", raw)
		}
		loopback := u.Hostname() == "localhost" || strings.HasPrefix(u.Hostname(), "127.") || u.Hostname() == "::1"
		if u.Scheme != "https" && !(u.Scheme == "http" && loopback) {
			t.Errorf("accepted %q: insecure scheme", raw)
		}
		if u.User != nil || strings.Contains(raw, "#") || strings.Contains(raw, " ") || broker.CheckText(raw) != nil {
			t.Errorf("accepted %q", raw)
		}
	})
}
