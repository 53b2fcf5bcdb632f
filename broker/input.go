package broker

import (
	"errors"
	"fmt"
	"net"
	"net/url"
	"regexp"
	"strings"
)

// MaxSecretLen bounds client secrets, usernames and passwords.
const MaxSecretLen = 1024

// NormalizeInstanceURL accepts `mycompany.acumatica.com`,
// `https://mycompany.acumatica.com`, `https://erp.example.com/AcumaticaERP`
// with or without a trailing slash, and returns `https://host[:port][/path]`.
// http is allowed only for loopback hosts unless allowInsecure is set. Query,
// fragment and user-info are rejected.
func NormalizeInstanceURL(raw string, allowInsecure bool) (string, error) {
	s := strings.TrimSpace(raw)
	if s == "" {
		return "", errors.New("is required")
	}
	if len(s) > 2048 {
		return "", errors.New("is longer than 2048 characters")
	}
	if strings.ContainsAny(s, " \t\r\n\\") {
		return "", errors.New("must be a URL such as https://mycompany.acumatica.com")
	}
	if !strings.Contains(s, "://") {
		s = "https://" + s
	}
	u, err := url.Parse(s)
	if err != nil {
		return "", errors.New("must be a URL such as https://mycompany.acumatica.com")
	}
	switch {
	case u.Scheme != "https" && u.Scheme != "http":
		return "", fmt.Errorf("scheme %q is not allowed; use https", u.Scheme)
	case u.User != nil:
		return "", errors.New("must not carry user info; put credentials in their own fields")
	case u.RawQuery != "" || u.ForceQuery:
		return "", errors.New("must not have a query")
	case u.Fragment != "" || strings.Contains(s, "#"):
		return "", errors.New("must not have a fragment")
	case u.Opaque != "":
		return "", errors.New("must be a URL such as https://mycompany.acumatica.com")
	}
	host := u.Hostname()
	if host == "" || !validHost(host) {
		return "", errors.New("must name a host, e.g. mycompany.acumatica.com")
	}
	if p := u.Port(); p != "" {
		var n int
		if _, err := fmt.Sscanf(p, "%d", &n); err != nil || n < 1 || n > 65535 || fmt.Sprint(n) != p {
			return "", fmt.Errorf("port %q is not valid", p)
		}
	}
	if u.Scheme == "http" && !allowInsecure && !isLoopback(host) {
		return "", errors.New("http is allowed only for loopback hosts; use https")
	}
	path := strings.TrimRight(u.EscapedPath(), "/")
	if strings.Contains(path, "//") || strings.Contains(path, "/../") || strings.HasSuffix(path, "/..") || strings.Contains(path, "/./") {
		return "", errors.New("path must be a plain virtual directory such as /AcumaticaERP")
	}
	out := u.Scheme + "://" + strings.ToLower(u.Host) + path
	if len(out) > 2048 {
		// Escaping can lengthen a path that fit before; judge the stored form,
		// so that what is stored always normalizes to itself.
		return "", errors.New("is longer than 2048 characters")
	}
	return out, nil
}

func validHost(h string) bool {
	if net.ParseIP(h) != nil {
		return true
	}
	if len(h) > 253 {
		return false
	}
	for _, label := range strings.Split(h, ".") {
		if label == "" || len(label) > 63 {
			return false
		}
		for i := 0; i < len(label); i++ {
			c := label[i]
			if !(c >= 'a' && c <= 'z' || c >= 'A' && c <= 'Z' || c >= '0' && c <= '9' || c == '-' || c == '_') {
				return false
			}
		}
	}
	return true
}

func isLoopback(host string) bool {
	if strings.EqualFold(host, "localhost") {
		return true
	}
	ip := net.ParseIP(host)
	return ip != nil && ip.IsLoopback()
}

var guidPattern = regexp.MustCompile(`^\{?[0-9A-Fa-f]{8}-[0-9A-Fa-f]{4}-[0-9A-Fa-f]{4}-[0-9A-Fa-f]{4}-[0-9A-Fa-f]{12}\}?$`)

// ValidateClientID checks the `<GUID>@<Tenant>` form of a Connected
// Application's client ID.
func ValidateClientID(id string) error {
	if id == "" {
		return errors.New("is required")
	}
	if len(id) > 256 {
		return errors.New("is longer than 256 characters")
	}
	if strings.ContainsAny(id, " \t\r\n") {
		return errors.New("must not contain white space")
	}
	guid, tenant, found := strings.Cut(id, "@")
	if !found {
		if guidPattern.MatchString(id) {
			return errors.New("is missing the @Tenant suffix: copy the full Client ID from the Connected Application (SM303010), e.g. 88358B02-A48D-A50E-F710-39C1636C30F6@MyTenant")
		}
		return errors.New("must have the form <GUID>@<Tenant>, copied in full from the Connected Application")
	}
	if !guidPattern.MatchString(guid) {
		return errors.New("must start with the application's GUID, in the form <GUID>@<Tenant>")
	}
	if tenant == "" || strings.Contains(tenant, "@") {
		return errors.New("must end with exactly one @Tenant suffix, in the form <GUID>@<Tenant>")
	}
	return nil
}

// ValidateSecretField checks a required credential: non-empty, at most
// [MaxSecretLen] bytes. The message never echoes the value.
func ValidateSecretField(v string) error {
	if v == "" {
		return errors.New("is required")
	}
	if len(v) > MaxSecretLen {
		return fmt.Errorf("is longer than %d bytes", MaxSecretLen)
	}
	return nil
}

var scopePattern = regexp.MustCompile(`^[\x21\x23-\x5B\x5D-\x7E]{1,128}$`)

// ValidateScopes checks OAuth scope tokens (RFC 6749 section 3.3).
func ValidateScopes(scopes []string) error {
	if len(scopes) > 32 {
		return errors.New("at most 32 scopes")
	}
	for _, s := range scopes {
		if !scopePattern.MatchString(s) {
			return fmt.Errorf("scope %q is not a valid scope token", s)
		}
	}
	return nil
}

// DefaultScopes are requested when a connection names none.
var DefaultScopes = []string{"api", "offline_access"}
