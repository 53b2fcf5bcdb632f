package acumaticatest

import (
	"crypto/sha256"
	"crypto/subtle"
	"encoding/base64"
	"net/http"
	"net/url"
	"slices"
	"strings"
	"time"
)

// The Authorization Code flow (RFC 6749 section 4.1) with PKCE (RFC 7636),
// as a Connected Application set to "Authorization Code" uses it. The
// stand-in consents on its own for the configured consent user, so a test
// or a person with curl can follow the authorization URL to the redirect
// without a browser.

// codeLifetime is how long an authorization code may wait for its
// exchange. RFC 6749 section 4.1.2 recommends at most 10 minutes; a
// shorter one, as here, makes an expired code easy to test.
const defaultCodeLifetime = time.Minute

// authCode is an issued authorization code.
type authCode struct {
	client      string
	redirectURI string
	challenge   string // S256 code_challenge
	scopes      []string
	user        string
	expires     time.Time
	used        bool
	session     string // the session its exchange opened, revoked if the code is replayed
}

// AddAuthCodeClient registers a Connected Application set to the
// Authorization Code flow with its registered redirect URIs (matched
// exactly, RFC 9700 section 2.1). Such a client cannot use the password
// grant: it answers unauthorized_client, as Acumatica does for an
// application set to another flow.
func (s *Server) AddAuthCodeClient(id, secret string, redirectURIs ...string) {
	s.mu.Lock()
	defer s.mu.Unlock()
	s.clients[id] = client{secret: secret, authCode: true, redirectURIs: slices.Clone(redirectURIs)}
}

// SetConsentUser names the user who is signed in at the authorize endpoint
// and consents to every request; "" (the default) denies every request
// with access_denied.
func (s *Server) SetConsentUser(name string) {
	s.mu.Lock()
	defer s.mu.Unlock()
	s.consentUser = name
}

// SetCodeLifetime changes how long codes issued from now on stay valid.
func (s *Server) SetCodeLifetime(d time.Duration) {
	s.mu.Lock()
	defer s.mu.Unlock()
	s.opts.CodeLifetime = d
}

// authorize answers GET /identity/connect/authorize. An unknown client or
// a redirect URI not registered exactly is answered with a 400 page, never
// a redirect (RFC 6749 section 4.1.2.1); every other refusal is a redirect
// carrying error and state.
func (s *Server) authorize(w http.ResponseWriter, r *http.Request) {
	q := r.URL.Query()
	s.mu.Lock()
	defer s.mu.Unlock()
	s.counts.AuthorizeRequests++
	cl, ok := s.clients[q.Get("client_id")]
	redirect := q.Get("redirect_uri")
	if !ok || !cl.authCode || !slices.Contains(cl.redirectURIs, redirect) {
		s.counts.AuthorizeRefused++
		http.Error(w, "unknown client or unregistered redirect_uri", http.StatusBadRequest)
		return
	}
	back := func(params url.Values) {
		params.Set("state", q.Get("state"))
		http.Redirect(w, r, withQuery(redirect, params), http.StatusFound)
	}
	if code := s.authorizeRefusalLocked(q); code != "" {
		s.counts.AuthorizeRefused++
		back(url.Values{"error": {code}})
		return
	}
	code := newToken("code-")
	s.codes[code] = &authCode{
		client: q.Get("client_id"), redirectURI: redirect, challenge: q.Get("code_challenge"),
		scopes: strings.Fields(q.Get("scope")), user: s.consentUser,
		expires: s.opts.Now().Add(s.opts.CodeLifetime),
	}
	// The state and the code join the tokens of leak scans.
	s.seen = append(s.seen, code, q.Get("state"))
	back(url.Values{"code": {code}})
}

// authorizeRefusalLocked is the OAuth error code for an authorization
// request that is refused, or "".
func (s *Server) authorizeRefusalLocked(q url.Values) string {
	switch {
	case q.Get("response_type") != "code":
		return "unsupported_response_type"
	case q.Get("code_challenge_method") != "S256" || len(q.Get("code_challenge")) != 43:
		// PKCE is required, and only S256 (RFC 9700 section 2.1.1).
		return "invalid_request"
	case q.Get("state") == "":
		return "invalid_request"
	case s.consentUser == "":
		return "access_denied"
	}
	return ""
}

func withQuery(base string, params url.Values) string {
	sep := "?"
	if strings.Contains(base, "?") {
		sep = "&"
	}
	return base + sep + params.Encode()
}

// codeGrantLocked exchanges an authorization code: the code must be live
// and unused, issued to this client for this exact redirect URI, and the
// verifier must hash to its challenge. A replayed code revokes the tokens
// its first exchange issued (RFC 6749 section 4.1.2).
func (s *Server) codeGrantLocked(f url.Values, now time.Time) (int, map[string]any) {
	if v := f.Get("code_verifier"); len(v) >= 8 {
		s.seen = append(s.seen, v) // for leak scans
	}
	ac, ok := s.codes[f.Get("code")]
	refuse := func() (int, map[string]any) {
		s.counts.InvalidGrant++
		return 400, map[string]any{"error": "invalid_grant"}
	}
	switch {
	case !ok || ac.client != f.Get("client_id"):
		return refuse()
	case ac.used:
		s.counts.CodeReuse++
		if ss, ok := s.sessions[ac.session]; ok {
			ss.ended = true
		}
		return refuse()
	}
	ac.used = true
	if now.After(ac.expires) || ac.redirectURI != f.Get("redirect_uri") || !pkceMatches(f.Get("code_verifier"), ac.challenge) {
		return refuse()
	}
	ss := &session{id: newToken("s"), user: ac.user, client: ac.client, start: now,
		access: map[string]time.Time{}, chainUsed: map[string]bool{}}
	s.sessions[ss.id] = ss
	ac.session = ss.id
	return 200, s.issue(ss, ac.scopes, now)
}

// pkceMatches reports whether verifier (43 to 128 characters) hashes to
// challenge under S256 (RFC 7636 section 4.6).
func pkceMatches(verifier, challenge string) bool {
	if len(verifier) < 43 || len(verifier) > 128 {
		return false
	}
	sum := sha256.Sum256([]byte(verifier))
	got := base64.RawURLEncoding.EncodeToString(sum[:])
	return subtle.ConstantTimeCompare([]byte(got), []byte(challenge)) == 1
}
