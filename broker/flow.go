package broker

import (
	"errors"
	"net/url"
	"strings"

	"tokenbroker/storage"
)

// Flows of a connection, as stored.
const (
	FlowPassword          = storage.FlowPassword
	FlowAuthorizationCode = storage.FlowAuthorizationCode
)

// maxRedirectURILen bounds a redirect URI; browsers and identity servers
// cope with far less than the URL limit.
const maxRedirectURILen = 2048

// isAuthCode reports whether cfg signs in with the Authorization Code flow.
func isAuthCode(cfg *storage.Connection) bool { return cfg.Flow == FlowAuthorizationCode }

// normalizeFlow checks the fields that depend on the flow. On create
// (fields nil) an empty flow means the password flow and is filled in; on
// update the flow is the stored one (c.Flow). An
// authorization-code connection has no username or password and needs a
// redirect URI; a password connection has no redirect URI.
func normalizeFlow(c *storage.Connection, has func(string) bool) []FieldViolation {
	var v []FieldViolation
	add := func(field, msg string) { v = append(v, FieldViolation{Field: field, Description: msg}) }
	switch c.Flow {
	case "":
		if !has("flow") {
			// An update checked without the stored connection at hand (the
			// server's request check): the broker checks again with it.
			return nil
		}
		c.Flow = FlowPassword
	case FlowPassword, FlowAuthorizationCode:
	default:
		add("flow", "must be FLOW_PASSWORD or FLOW_AUTHORIZATION_CODE")
		return v
	}
	if !isAuthCode(c) {
		if has("redirect_uri") && c.RedirectURI != "" {
			add("redirect_uri", "is for FLOW_AUTHORIZATION_CODE connections only; a password connection has none")
		}
		return v
	}
	if has("username") && c.Username != "" {
		add("username", "must be empty: a FLOW_AUTHORIZATION_CODE connection signs in through the browser, not as an integration user")
	}
	if has("password") && c.Password != "" {
		add("password", "must be empty: a FLOW_AUTHORIZATION_CODE connection has no password")
	}
	if has("redirect_uri") {
		if err := ValidateRedirectURI(c.RedirectURI); err != nil {
			add("redirect_uri", err.Error())
		}
	}
	return v
}

// credential is a credential field's API name and value.
type credential struct{ name, val string }

// requiredCredentials are the credentials c's flow requires: the client
// secret, and for the password flow the integration user's login.
func requiredCredentials(c *storage.Connection) []credential {
	if isAuthCode(c) {
		return []credential{{"client_secret", c.ClientSecret}}
	}
	return []credential{{"client_secret", c.ClientSecret}, {"username", c.Username}, {"password", c.Password}}
}

// ValidateRedirectURI checks a redirect URI as registered on a Connected
// Application: an absolute https URL (http only on a loopback host, RFC
// 8252 section 7.3), no fragment or user-info (RFC 6749 section 3.1.2). It
// is kept exactly as given: identity servers compare it byte for byte
// (RFC 9700 section 2.1).
func ValidateRedirectURI(raw string) error {
	switch {
	case raw == "":
		return errors.New("is required for FLOW_AUTHORIZATION_CODE: copy the Redirect URI registered on the Connected Application")
	case len(raw) > maxRedirectURILen:
		return errors.New("is longer than 2048 characters")
	case strings.Contains(raw, " "):
		return errors.New("must not contain spaces")
	}
	if err := CheckText(raw); err != nil {
		return err
	}
	u, err := url.Parse(raw)
	if err != nil || !u.IsAbs() || u.Host == "" || u.Opaque != "" {
		return errors.New("must be an absolute URL such as https://app.example.com/acumatica/callback")
	}
	switch {
	case u.Fragment != "" || strings.Contains(raw, "#"):
		return errors.New("must not have a fragment")
	case u.User != nil:
		return errors.New("must not carry user information")
	case u.Scheme == "https":
		return nil
	case u.Scheme == "http" && isLoopback(u.Hostname()):
		return nil
	}
	return errors.New("must use https (http only on a loopback host)")
}
