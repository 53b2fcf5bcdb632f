package broker

import (
	"errors"
	"fmt"
	"net"
	"net/url"
	"regexp"
	"strconv"
	"strings"
	"unicode/utf8"
)

// MaxSecretLen bounds client secrets, usernames and passwords.
const MaxSecretLen = 1024

// NormalizeInstanceURL accepts `mycompany.acumatica.com`,
// `https://mycompany.acumatica.com`, `https://erp.example.com/AcumaticaERP`
// with or without a trailing slash, and returns `https://host[:port][/path]`.
// http is allowed only for loopback hosts unless allowInsecure is set. Query,
// fragment and user-info are rejected.
func NormalizeInstanceURL(raw string, allowInsecure bool) (string, error) {
	u, err := parseInstanceURL(raw)
	if err != nil {
		return "", err
	}
	if err := checkHostPort(u); err != nil {
		return "", err
	}
	if u.Scheme == "http" && !allowInsecure && !isLoopback(u.Hostname()) {
		return "", errors.New("http is allowed only for loopback hosts; use https")
	}
	path := strings.TrimRight(u.EscapedPath(), "/")
	if !plainPath(path) {
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

// errNotAURL is the answer to input that is no URL at all.
var errNotAURL = errors.New("must be a URL such as https://mycompany.acumatica.com")

// parseInstanceURL parses raw as an http(s) URL (https when it names no
// scheme) without user info, query or fragment.
func parseInstanceURL(raw string) (*url.URL, error) {
	s := strings.TrimSpace(raw)
	switch {
	case s == "":
		return nil, errors.New("is required")
	case len(s) > 2048:
		return nil, errors.New("is longer than 2048 characters")
	}
	if err := CheckText(s); err != nil {
		return nil, err
	}
	if strings.ContainsAny(s, " \\") {
		return nil, errNotAURL
	}
	if !strings.Contains(s, "://") {
		s = "https://" + s
	}
	u, err := url.Parse(s)
	switch {
	case err != nil || u.Opaque != "":
		return nil, errNotAURL
	case u.Scheme != "https" && u.Scheme != "http":
		return nil, fmt.Errorf("scheme %q is not allowed; use https", u.Scheme)
	case u.User != nil:
		return nil, errors.New("must not carry user info; put credentials in their own fields")
	case u.RawQuery != "" || u.ForceQuery:
		return nil, errors.New("must not have a query")
	case u.Fragment != "" || strings.Contains(s, "#"):
		return nil, errors.New("must not have a fragment")
	}
	return u, nil
}

// checkHostPort checks that u names a host, and a valid port if any.
func checkHostPort(u *url.URL) error {
	if strings.HasSuffix(u.Host, ":") {
		// An empty port is refused rather than dropped: it is most often a
		// port left out by mistake, and the default would reach another
		// service.
		return errors.New("has an empty port: remove the colon, or give the port")
	}
	if host := u.Hostname(); host == "" || !validHost(host) {
		return errors.New("must name a host, e.g. mycompany.acumatica.com")
	}
	if p := u.Port(); p != "" {
		n, err := strconv.Atoi(p)
		if err != nil || n < 1 || n > 65535 || strconv.Itoa(n) != p {
			return fmt.Errorf("port %q is not valid", p)
		}
	}
	return nil
}

// plainPath reports whether an escaped path is empty or /-separated
// segments that are neither empty nor dot segments, once decoded (%2e%2e
// is ..), and hold no encoded / or \.
func plainPath(escaped string) bool {
	if escaped == "" {
		return true
	}
	segs := strings.Split(escaped, "/")
	if segs[0] != "" {
		return false
	}
	for _, seg := range segs[1:] {
		dec, err := url.PathUnescape(seg)
		if err != nil || dec == "" || dec == "." || dec == ".." || strings.ContainsAny(dec, "/\\") || CheckText(dec) != nil {
			return false
		}
	}
	return true
}

// CheckText refuses what no string field may hold: invalid UTF-8 (and
// U+FFFD, which the API's edge puts in its place) and control characters:
// C0 (NUL, ESC, tab, newlines …), DEL and C1. The message never echoes the
// value, so it fits secrets too.
func CheckText(s string) error {
	if !utf8.ValidString(s) || strings.ContainsRune(s, utf8.RuneError) {
		return errors.New("is not valid UTF-8")
	}
	for _, r := range s {
		if r < 0x20 || r >= 0x7f && r <= 0x9f {
			return fmt.Errorf("must not contain control characters (found U+%04X)", r)
		}
	}
	return nil
}

// ValidateDisplayName checks a connection's display name: at most 256
// bytes of text.
func ValidateDisplayName(s string) error {
	if len(s) > 256 {
		return errors.New("is longer than 256 characters")
	}
	return CheckText(s)
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
	if err := CheckText(id); err != nil {
		return err
	}
	if strings.Contains(id, " ") {
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

// ValidateSecretField checks a required credential (client secret,
// username, password): non-empty, at most [MaxSecretLen] bytes of text
// without control characters ([CheckText]). The message never echoes the
// value.
func ValidateSecretField(v string) error {
	if v == "" {
		return errors.New("is required")
	}
	if len(v) > MaxSecretLen {
		return fmt.Errorf("is longer than %d bytes", MaxSecretLen)
	}
	return CheckText(v)
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
