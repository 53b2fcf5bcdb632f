package broker

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"math"
	"mime"
	"net"
	"net/http"
	"net/http/httptrace"
	"net/url"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"time"

	"go.opentelemetry.io/otel/trace"
)

// Grant types.
const (
	grantPassword = "password"
	grantRefresh  = "refresh_token"
)

// maxBody bounds what is read of any upstream answer.
const maxBody = 64 << 10

// endpoints are an instance's identity endpoints.
type endpoints struct {
	token      string
	revocation string
	authorize  string
	fetched    time.Time
}

// upstream talks to Acumatica identity servers. Token requests are written
// by hand rather than through golang.org/x/oauth2: a one-time refresh token
// must be captured from a 200 answer even when the rest of the answer is
// unusable, failures must be classed by whether the request was sent, and
// Retry-After must be read; x/oauth2 exposes none of these.
type upstream struct {
	client *http.Client
	now    func() time.Time
	ttl    time.Duration
	tracer trace.Tracer

	mu    sync.Mutex            // guards cache
	cache map[string]*endpoints // instance URL -> discovered endpoints
}

func newUpstream(timeout time.Duration, transport http.RoundTripper, now func() time.Time, tracer trace.Tracer) *upstream {
	return &upstream{
		client: &http.Client{
			Timeout:   timeout,
			Transport: transport,
			// Never follow redirects: credentials and one-time tokens must
			// not be re-sent anywhere else.
			CheckRedirect: func(*http.Request, []*http.Request) error { return http.ErrUseLastResponse },
		},
		now:    now,
		tracer: tracer,
		ttl:    time.Hour,
		cache:  map[string]*endpoints{},
	}
}

// endpointsFor returns the instance's token and revocation endpoints from its
// discovery document, falling back to the well-known paths. Endpoints on a
// different origin than the instance are ignored.
func (u *upstream) endpointsFor(ctx context.Context, instance string) endpoints {
	u.mu.Lock()
	ep, ok := u.cache[instance]
	u.mu.Unlock()
	if ok && u.now().Sub(ep.fetched) < u.ttl {
		return *ep
	}
	fresh := endpoints{
		token:      instance + "/identity/connect/token",
		revocation: instance + "/identity/connect/revocation",
		authorize:  instance + "/identity/connect/authorize",
		fetched:    u.now(),
	}
	if doc, err := u.discover(ctx, instance); err == nil {
		if sameOrigin(instance, doc.TokenEndpoint) {
			fresh.token = doc.TokenEndpoint
		}
		if sameOrigin(instance, doc.RevocationEndpoint) {
			fresh.revocation = doc.RevocationEndpoint
		}
		if sameOrigin(instance, doc.AuthorizationEndpoint) {
			fresh.authorize = doc.AuthorizationEndpoint
		}
	} else if ctx.Err() == nil {
		// Remember the fallback briefly rather than asking on every call.
		fresh.fetched = u.now().Add(-u.ttl + time.Minute)
	}
	u.mu.Lock()
	u.cache[instance] = &fresh
	u.mu.Unlock()
	return fresh
}

type discoveryDoc struct {
	TokenEndpoint      string `json:"token_endpoint"`
	RevocationEndpoint string `json:"revocation_endpoint"`
	// AuthorizationEndpoint is where StartAuthorization sends the browser.
	AuthorizationEndpoint string `json:"authorization_endpoint"`
}

func (u *upstream) discover(ctx context.Context, instance string) (*discoveryDoc, error) {
	ctx, cancel := context.WithTimeout(ctx, 10*time.Second)
	defer cancel()
	req, err := http.NewRequestWithContext(ctx, http.MethodGet, instance+"/identity/.well-known/openid-configuration", nil)
	if err != nil {
		return nil, err
	}
	req.Header.Set("Accept", "application/json")
	_, span := startUpstream(ctx, u.tracer, "discovery", http.MethodGet)
	resp, err := u.client.Do(req)
	endHTTP(span, resp, err)
	if err != nil {
		return nil, err
	}
	defer resp.Body.Close()
	if resp.StatusCode != http.StatusOK {
		return nil, fmt.Errorf("discovery: HTTP %d", resp.StatusCode)
	}
	var doc discoveryDoc
	if err := json.NewDecoder(io.LimitReader(resp.Body, maxBody)).Decode(&doc); err != nil {
		return nil, fmt.Errorf("discovery: %w", err)
	}
	return &doc, nil
}

func sameOrigin(instance, endpoint string) bool {
	if endpoint == "" {
		return false
	}
	a, err1 := url.Parse(instance)
	b, err2 := url.Parse(endpoint)
	return err1 == nil && err2 == nil && a.Scheme == b.Scheme && strings.EqualFold(a.Host, b.Host) && b.User == nil
}

// tokenResponse is a parsed 200 answer of the token endpoint.
type tokenResponse struct {
	AccessToken  string
	TokenType    string
	RefreshToken string
	ExpiresIn    time.Duration
	Scopes       []string
}

// failureClass says what an upstream failure means for the refresh token.
type failureClass int

const (
	// classSafe: the request was not processed (not sent, 429, 503); the
	// same refresh token may be retried.
	classSafe failureClass = iota + 1
	// classAmbiguous: the request may have been processed; the refresh token
	// may be spent, so it is never presented again.
	classAmbiguous
	// classInvalidGrant: the grant (refresh token or user) was rejected.
	classInvalidGrant
	// classInvalidClient: the client id or secret was rejected.
	classInvalidClient
	// classLoginLimit: the user's concurrent sign-ins are used up.
	classLoginLimit
	// classProtocol: a 200 answer that is unusable.
	classProtocol
	// classAddressRefused: the address was refused when connecting (see
	// [UpstreamRules]); nothing was sent, and retrying cannot help until an
	// operator acts.
	classAddressRefused
)

func (c failureClass) String() string {
	switch c {
	case classSafe:
		return "safe"
	case classAmbiguous:
		return "ambiguous"
	case classInvalidGrant:
		return "invalid_grant"
	case classInvalidClient:
		return "invalid_client"
	case classLoginLimit:
		return "login_limit"
	case classProtocol:
		return "protocol"
	case classAddressRefused:
		return "address_refused"
	}
	return "unknown"
}

// upstreamError is a classified failure of one upstream request. detail is
// scrubbed: it never holds a secret, a token or a raw body.
type upstreamError struct {
	class      failureClass
	grant      string // the grant that failed
	status     int
	code       string
	detail     string
	retryAfter time.Duration
}

func (e *upstreamError) Error() string {
	var b strings.Builder
	b.WriteString("upstream ")
	if e.status != 0 {
		fmt.Fprintf(&b, "HTTP %d", e.status)
	} else {
		b.WriteString("request failed")
	}
	if e.code != "" {
		b.WriteString(" " + e.code)
	}
	if e.detail != "" {
		b.WriteString(": " + e.detail)
	}
	return b.String()
}

// reason is the reason code of the failure: the one place that names it,
// for renewals and proofs alike.
func (e *upstreamError) reason() string {
	switch e.class {
	case classInvalidGrant:
		if e.grant == grantRefresh {
			return ReasonRefreshTokenRevoked
		}
		return ReasonCredentialsRejected
	case classInvalidClient:
		return ReasonClientRejected
	case classLoginLimit:
		return ReasonLoginLimit
	case classProtocol:
		return ReasonUpstreamProtocol
	case classAddressRefused:
		return ReasonUpstreamAddressRefused
	}
	if e.status == http.StatusTooManyRequests {
		return ReasonUpstreamRateLimited
	}
	return ReasonUpstreamUnavailable
}

// toError is the broker's error for a failure that ends a request for
// name: the one mapping from class to kind, reason and message. retryAfter
// applies to the failures a caller may retry.
func (e *upstreamError) toError(name string, retryAfter time.Duration) *Error {
	r := e.reason()
	switch r {
	case ReasonCredentialsRejected:
		return newError(ErrCredentialsRejected, r, name,
			"upstream rejected the username or password (%s); check the integration user's login, password and tenant", e)
	case ReasonClientRejected:
		return newError(ErrCredentialsRejected, r, name,
			"upstream rejected the client (%s); check the client ID (<GUID>@<Tenant>), the shared secret and its expiry, and that the Connected Application uses Resource Owner Password Credentials", e)
	case ReasonUpstreamAddressRefused:
		return newError(ErrAddressRefused, r, name, "%s", e)
	}
	out := newError(ErrUpstreamUnavailable, r, name, "%s", e)
	if r == ReasonLoginLimit {
		out = newError(ErrLoginLimit, r, name, "the integration user's concurrent sign-ins are used up; sign other sessions out or raise the limit")
	}
	out.RetryAfter = retryAfter
	return out
}

// tokenRequest posts a form to the token endpoint (client credentials in the
// body, as Acumatica expects) and classifies the outcome. A 200 answer that
// carries a refresh token is returned even when it is otherwise unusable, so
// the caller can commit the rotated refresh token; err is then set too.
func (u *upstream) tokenRequest(ctx context.Context, endpoint string, form url.Values, secrets []string) (*tokenResponse, error) {
	var sent bool
	var sentMu sync.Mutex
	trace := &httptrace.ClientTrace{
		WroteHeaders: func() { sentMu.Lock(); sent = true; sentMu.Unlock() },
	}
	req, err := http.NewRequestWithContext(httptrace.WithClientTrace(ctx, trace), http.MethodPost, endpoint, strings.NewReader(form.Encode()))
	if err != nil {
		return nil, &upstreamError{class: classSafe, detail: "bad token endpoint"}
	}
	req.Header.Set("Content-Type", "application/x-www-form-urlencoded")
	req.Header.Set("Accept", "application/json")
	resp, err := u.client.Do(req)
	if err != nil {
		sentMu.Lock()
		wasSent := sent
		sentMu.Unlock()
		ue := classifyTransport(err, wasSent)
		ue.grant = form.Get("grant_type")
		return nil, ue
	}
	defer resp.Body.Close()
	body, readErr := io.ReadAll(io.LimitReader(resp.Body, maxBody))
	if resp.StatusCode == http.StatusOK {
		if readErr != nil {
			return nil, &upstreamError{class: classAmbiguous, status: 200, detail: "answer cut off"}
		}
		return parseTokenResponse(body, secrets)
	}
	return nil, classifyStatus(resp, body, form.Get("grant_type"), secrets)
}

func classifyTransport(err error, sent bool) *upstreamError {
	var ne net.Error
	if msg, ok := refusedAddress(err); ok {
		return &upstreamError{class: classAddressRefused, detail: msg}
	}
	switch {
	case errors.Is(err, syscall.ECONNREFUSED):
		return &upstreamError{class: classSafe, detail: "connection refused"}
	case !sent:
		return &upstreamError{class: classSafe, detail: "request not sent: " + transportKind(err)}
	case errors.As(err, &ne) && ne.Timeout(), errors.Is(err, context.DeadlineExceeded):
		return &upstreamError{class: classAmbiguous, detail: "timeout after the request was sent"}
	default:
		return &upstreamError{class: classAmbiguous, detail: "connection failed after the request was sent: " + transportKind(err)}
	}
}

// transportKind names a transport error without echoing URLs or bodies.
func transportKind(err error) string {
	var ne net.Error
	var dns *net.DNSError
	if msg, ok := refusedAddress(err); ok {
		return msg
	}
	switch {
	case errors.As(err, &dns):
		return "DNS lookup failed"
	case errors.Is(err, syscall.ECONNRESET):
		return "connection reset"
	case errors.Is(err, io.EOF), errors.Is(err, io.ErrUnexpectedEOF):
		return "connection closed"
	case errors.As(err, &ne) && ne.Timeout():
		return "timeout"
	case errors.Is(err, context.Canceled):
		return "canceled"
	}
	return "network error"
}

// classifyStatus classes a non-200 answer of the token endpoint to a grant:
// the one place that decides what an upstream failure means (see
// statusClass).
func classifyStatus(resp *http.Response, body []byte, grant string, secrets []string) *upstreamError {
	e := &upstreamError{grant: grant, status: resp.StatusCode, retryAfter: parseRetryAfter(resp.Header.Get("Retry-After"), time.Now())}
	var oe struct {
		Error       string `json:"error"`
		Description string `json:"error_description"`
	}
	mt, _, _ := mime.ParseMediaType(resp.Header.Get("Content-Type"))
	if strings.Contains(mt, "json") || bytes.HasPrefix(bytes.TrimSpace(body), []byte("{")) {
		if json.Unmarshal(body, &oe) == nil {
			e.code = scrub(oe.Error, 64, secrets)
			e.detail = scrub(oe.Description, 200, secrets)
		}
	}
	if e.detail == "" && e.code == "" {
		e.detail = fmt.Sprintf("%s answer of %d bytes", orDefault(mt, "untyped"), len(body))
	}
	loginLimit := bytes.Contains(bytes.ToLower(body), []byte("api login limit"))
	e.class = statusClass(resp.StatusCode, oe.Error, loginLimit, grant)
	switch {
	case loginLimit:
		e.detail = "API Login Limit reached for the integration user"
	case resp.StatusCode >= 300 && resp.StatusCode < 400:
		e.detail = "token endpoint answered with a redirect, which is not followed"
	}
	return e
}

// statusClass decides what a token endpoint's answer with status, OAuth
// error code oauthErr, and a body that does or does not name Acumatica's
// API login limit, means for a grant. The order of the cases matters.
func statusClass(status int, oauthErr string, loginLimit bool, grant string) failureClass {
	switch {
	case loginLimit:
		return classLoginLimit
	case status == http.StatusTooManyRequests && grant == grantPassword:
		// A password grant opens a session: 429 on it means the user's
		// concurrent sign-ins (a licence limit) are used up.
		return classLoginLimit
	case status >= 300 && status < 400:
		// A redirect is not followed; nothing reached the token endpoint.
		return classSafe
	case oauthErr == "invalid_client" || status == http.StatusUnauthorized:
		return classInvalidClient
	case oauthErr == "invalid_grant":
		return classInvalidGrant
	case status == http.StatusTooManyRequests, status == http.StatusServiceUnavailable:
		return classSafe
	case status >= 500:
		// 500, 502, 504 and the rest may have been processed upstream.
		return classAmbiguous
	case oauthErr == "unauthorized_client" || oauthErr == "unsupported_grant_type" || oauthErr == "invalid_scope":
		// The Connected Application is set up for another flow or scope:
		// an operator must act, retrying cannot help.
		return classInvalidClient
	}
	return classAmbiguous
}

func orDefault(s, d string) string {
	if s == "" {
		return d
	}
	return s
}

// parseTokenResponse parses a 200 answer. A refresh token present in an
// otherwise unusable answer is returned with the error, whose text holds
// none of the request's secrets.
func parseTokenResponse(body []byte, secrets []string) (*tokenResponse, error) {
	var raw struct {
		AccessToken  string          `json:"access_token"`
		TokenType    string          `json:"token_type"`
		RefreshToken string          `json:"refresh_token"`
		ExpiresIn    json.RawMessage `json:"expires_in"`
		Scope        string          `json:"scope"`
	}
	if err := json.Unmarshal(body, &raw); err != nil {
		return nil, &upstreamError{class: classProtocol, status: 200, detail: "answer is not a JSON token response"}
	}
	tr := &tokenResponse{
		AccessToken:  raw.AccessToken,
		TokenType:    raw.TokenType,
		RefreshToken: raw.RefreshToken,
		Scopes:       strings.Fields(raw.Scope),
	}
	if tr.TokenType == "" {
		tr.TokenType = "Bearer"
	}
	secs, ok := parseExpiresIn(raw.ExpiresIn)
	switch {
	case raw.AccessToken == "":
		return tr, &upstreamError{class: classProtocol, status: 200, detail: "answer has no access_token"}
	case !strings.EqualFold(tr.TokenType, "bearer"):
		return tr, &upstreamError{class: classProtocol, status: 200, detail: fmt.Sprintf("token_type %q is not Bearer", scrub(tr.TokenType, 32, secrets))}
	case !ok:
		return tr, &upstreamError{class: classProtocol, status: 200, detail: "answer has a nonsensical expires_in"}
	}
	tr.ExpiresIn = time.Duration(secs) * time.Second
	return tr, nil
}

// Bounds of expires_in. RFC 6749 section 5.1 allows any positive lifetime,
// and some identity servers (and most test setups) issue tokens that live a
// few seconds. A week is far beyond any access token's life: a larger value
// is a broken server, and a token held that long would outlive revocation.
const (
	minExpiresIn = 1
	maxExpiresIn = 7 * 24 * 3600
	// defaultExpiresIn applies when a 200 answer has no expires_in. RFC
	// 6749 section 5.1 makes it RECOMMENDED and leaves the default to the
	// server's documentation; Acumatica's access tokens live one hour.
	// Refusing the answer would lose the rotated refresh token it carries.
	defaultExpiresIn = 3600
)

// parseExpiresIn accepts a whole number of seconds, as a JSON number or
// numeric string, from minExpiresIn to maxExpiresIn; a missing (or null)
// expires_in means defaultExpiresIn.
func parseExpiresIn(raw json.RawMessage) (int64, bool) {
	if len(raw) == 0 || string(raw) == "null" {
		return defaultExpiresIn, true
	}
	s := strings.Trim(string(raw), `"`)
	f, err := strconv.ParseFloat(s, 64)
	if err != nil || math.IsNaN(f) || f != math.Trunc(f) || f < minExpiresIn || f > maxExpiresIn {
		return 0, false
	}
	return int64(f), true
}

// parseRetryAfter reads delay-seconds or an HTTP date, capped at one hour.
func parseRetryAfter(v string, now time.Time) time.Duration {
	v = strings.TrimSpace(v)
	if v == "" {
		return 0
	}
	var d time.Duration
	if n, err := strconv.Atoi(v); err == nil {
		d = time.Duration(n) * time.Second
	} else if t, err := http.ParseTime(v); err == nil {
		d = t.Sub(now)
	}
	return min(max(d, 0), time.Hour)
}

// revokeAndLogout asks the revocation endpoint to revoke a refresh token,
// and signs the session out with the access token. Both are best effort.
func (u *upstream) revokeAndLogout(ctx context.Context, instance, clientID, clientSecret, refreshToken, accessToken string) {
	ep := u.endpointsFor(ctx, instance)
	if refreshToken != "" {
		form := url.Values{
			"token":           {refreshToken},
			"token_type_hint": {"refresh_token"},
			"client_id":       {clientID},
			"client_secret":   {clientSecret},
		}
		if req, err := http.NewRequestWithContext(ctx, http.MethodPost, ep.revocation, strings.NewReader(form.Encode())); err == nil {
			req.Header.Set("Content-Type", "application/x-www-form-urlencoded")
			_, span := startUpstream(ctx, u.tracer, "revocation", http.MethodPost)
			resp, err := u.client.Do(req)
			endHTTP(span, resp, err)
			if err == nil {
				io.Copy(io.Discard, io.LimitReader(resp.Body, maxBody))
				resp.Body.Close()
			}
		}
	}
	if accessToken != "" {
		if req, err := http.NewRequestWithContext(ctx, http.MethodPost, instance+"/entity/auth/logout", nil); err == nil {
			req.Header.Set("Authorization", "Bearer "+accessToken)
			_, span := startUpstream(ctx, u.tracer, "logout", http.MethodPost)
			resp, err := u.client.Do(req)
			endHTTP(span, resp, err)
			if err == nil {
				io.Copy(io.Discard, io.LimitReader(resp.Body, maxBody))
				resp.Body.Close()
			}
		}
	}
}
