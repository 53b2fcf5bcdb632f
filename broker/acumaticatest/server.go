package acumaticatest

import (
	"crypto/rand"
	"encoding/hex"
	"encoding/json"
	"fmt"
	"net/http"
	"net/http/httptest"
	"net/url"
	"slices"
	"strconv"
	"strings"
	"sync"
	"time"
)

// Fault is one injected misbehaviour of the token endpoint.
type Fault struct {
	// Status answers with this HTTP status (and Body, ContentType).
	Status      int
	Body        string
	ContentType string
	// RetryAfter sets the Retry-After header.
	RetryAfter string
	// Delay waits before answering (or before the fault).
	Delay time.Duration
	// Hang waits until the client gives up.
	Hang bool
	// Reset closes the connection without an answer.
	Reset bool
	// Process makes the fault apply after the grant was processed (the
	// refresh token is spent, the answer is lost): models an ambiguous
	// failure.
	Process bool
	// Mutate rewrites a processed 200 answer (missing fields, bad
	// expires_in); it implies Process.
	Mutate func(map[string]any)
	// Redirect answers 307 to this location.
	Redirect string
	// Arrived, when set, receives a value when a request takes this fault.
	Arrived chan<- struct{}
	// Release, when set, holds the request until it is closed (or the
	// client gives up), then lets it go on to the rest of the fault, or to
	// a normal answer.
	Release <-chan struct{}
	// Processed, when set, receives a value once the grant was processed
	// (with Process or Mutate), before the answer is written.
	Processed chan<- struct{}
	// HoldAfterProcess waits after processing, before answering, until the
	// client gives up or the time passes: the refresh token is spent and
	// the answer may never arrive.
	HoldAfterProcess time.Duration
}

// Options configure [New]. Zero fields mean defaults.
type Options struct {
	// Now returns the current time. Default time.Now.
	Now func() time.Time
	// AccessTokenLifetime is expires_in. Default 1 h.
	AccessTokenLifetime time.Duration
	// SlidingLifetime is the refresh token's idle window. Default 15 days.
	SlidingLifetime time.Duration
	// AbsoluteLifetime caps a chain from its password grant; 0 is infinite.
	AbsoluteLifetime time.Duration
	// MaxSessions is the user's concurrent sign-in limit; 0 is unlimited.
	MaxSessions int
	// NoRefreshTokens makes the server issue none (offline_access not
	// granted to the application).
	NoRefreshTokens bool
	// RevokeAccessOnRefresh revokes the previous access token of a session
	// when its refresh token rotates.
	RevokeAccessOnRefresh bool
	// Latency delays every token request before it is processed, and
	// LatencyAfter after it was processed, before the answer is written
	// (a client that goes away then has spent its refresh token).
	Latency      time.Duration
	LatencyAfter time.Duration
	// Entities readable by the user's role; others known answer 403.
	// Default SalesOrder, Shipment, StockItem.
	Entities []string
	// CodeLifetime is how long an authorization code stays valid. Default
	// 1 min.
	CodeLifetime time.Duration
}

// Counts are what the server saw.
type Counts struct {
	PasswordGrants    int `json:"password_grants"`
	RefreshGrants     int `json:"refresh_grants"`
	InvalidGrant      int `json:"invalid_grant"`
	InvalidClient     int `json:"invalid_client"`
	ReuseDetected     int `json:"reuse_detected"`
	LoginLimit        int `json:"login_limit"`
	Faults            int `json:"faults"`
	Revocations       int `json:"revocations"`
	Logouts           int `json:"logouts"`
	EntityReads       int `json:"entity_reads"`
	Discovery         int `json:"discovery"`
	MaxConcurrentUser int `json:"max_concurrent_per_user"`
	OpenSessions      int `json:"open_sessions"`
	AuthorizeRequests int `json:"authorize_requests"`
	AuthorizeRefused  int `json:"authorize_refused"`
	CodeGrants        int `json:"code_grants"`
	CodeReuse         int `json:"code_reuse"`
}

type client struct {
	secret       string
	authCode     bool     // set to the Authorization Code flow: no password grant
	redirectURIs []string // registered redirect URIs, matched exactly
}

type user struct{ password string }

type session struct {
	id        string
	user      string
	client    string
	start     time.Time
	refresh   string // current refresh token
	access    map[string]time.Time
	ended     bool
	lastUse   time.Time
	chainUsed map[string]bool // spent refresh tokens of this chain
}

// Server is the stand-in. Safe for concurrent use.
type Server struct {
	opts Options

	mu       sync.Mutex // guards everything below
	clients  map[string]client
	users    map[string]user
	sessions map[string]*session
	refresh  map[string]*session // any refresh token of a chain, spent or current
	access   map[string]*session
	faults   []Fault
	counts   Counts
	inflight map[string]int
	seen     []string // every token and code issued, for leak scans

	codes       map[string]*authCode // authorization codes, used or not
	consentUser string               // who consents at the authorize endpoint
}

// New returns a stand-in with no clients or users.
func New(opts Options) *Server {
	if opts.Now == nil {
		opts.Now = time.Now
	}
	if opts.AccessTokenLifetime == 0 {
		opts.AccessTokenLifetime = time.Hour
	}
	if opts.SlidingLifetime == 0 {
		opts.SlidingLifetime = 15 * 24 * time.Hour
	}
	if opts.CodeLifetime == 0 {
		opts.CodeLifetime = defaultCodeLifetime
	}
	if opts.Entities == nil {
		opts.Entities = []string{"SalesOrder", "Shipment", "StockItem"}
	}
	return &Server{
		opts: opts, clients: map[string]client{}, users: map[string]user{},
		sessions: map[string]*session{}, refresh: map[string]*session{}, access: map[string]*session{},
		inflight: map[string]int{}, codes: map[string]*authCode{},
	}
}

// AddClient registers a Connected Application.
func (s *Server) AddClient(id, secret string) {
	s.mu.Lock()
	defer s.mu.Unlock()
	s.clients[id] = client{secret: secret}
}

// AddUser registers a user or changes its password. Changing a password
// ends the user's sessions and revokes their refresh tokens, as Acumatica
// does.
func (s *Server) AddUser(name, password string) {
	s.mu.Lock()
	defer s.mu.Unlock()
	if _, ok := s.users[name]; ok {
		for _, ss := range s.sessions {
			if ss.user == name {
				ss.ended = true
			}
		}
	}
	s.users[name] = user{password: password}
}

// SetNoRefreshTokens switches whether the server issues refresh tokens (as
// when offline_access is removed from the Connected Application).
func (s *Server) SetNoRefreshTokens(none bool) {
	s.mu.Lock()
	defer s.mu.Unlock()
	s.opts.NoRefreshTokens = none
}

// SetAccessTokenLifetime changes expires_in of the tokens issued from now
// on (e.g. to a few seconds, as some identity servers issue).
func (s *Server) SetAccessTokenLifetime(d time.Duration) {
	s.mu.Lock()
	defer s.mu.Unlock()
	s.opts.AccessTokenLifetime = d
}

// RevokeRefreshTokens ends every session: every refresh and access token
// dies.
func (s *Server) RevokeRefreshTokens() {
	s.mu.Lock()
	defer s.mu.Unlock()
	for _, ss := range s.sessions {
		ss.ended = true
	}
}

// Inject queues faults; each applies to one token request, in order.
func (s *Server) Inject(f ...Fault) {
	s.mu.Lock()
	defer s.mu.Unlock()
	s.faults = append(s.faults, f...)
}

// ClearFaults drops queued faults.
func (s *Server) ClearFaults() {
	s.mu.Lock()
	defer s.mu.Unlock()
	s.faults = nil
}

// Counts returns a copy of the counters.
func (s *Server) Counts() Counts {
	s.mu.Lock()
	defer s.mu.Unlock()
	c := s.counts
	for _, ss := range s.sessions {
		if !ss.ended {
			c.OpenSessions++
		}
	}
	return c
}

// Issued returns every token and authorization code the server has issued,
// and every state and PKCE verifier it was shown, for leak scans.
func (s *Server) Issued() []string {
	s.mu.Lock()
	defer s.mu.Unlock()
	return slices.Clone(s.seen)
}

// AccessTokenValid reports whether an access token is live.
func (s *Server) AccessTokenValid(tok string) bool {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.accessValidLocked(tok)
}

func (s *Server) accessValidLocked(tok string) bool {
	ss, ok := s.access[tok]
	if !ok || ss.ended {
		return false
	}
	exp, ok := ss.access[tok]
	return ok && s.opts.Now().Before(exp)
}

// Handler returns the HTTP handler.
func (s *Server) Handler() http.Handler {
	mux := http.NewServeMux()
	mux.HandleFunc("POST /identity/connect/token", s.token)
	mux.HandleFunc("GET /identity/.well-known/openid-configuration", s.discovery)
	mux.HandleFunc("GET /identity/connect/authorize", s.authorize)
	mux.HandleFunc("POST /identity/connect/revocation", s.revocation)
	mux.HandleFunc("POST /entity/auth/logout", s.logout)
	mux.HandleFunc("GET /entity/{endpoint}/{version}/{entity}", s.entity)
	return mux
}

// Start runs the server on a loopback httptest listener.
func (s *Server) Start() *httptest.Server { return httptest.NewServer(s.Handler()) }

func (s *Server) discovery(w http.ResponseWriter, r *http.Request) {
	s.mu.Lock()
	s.counts.Discovery++
	s.mu.Unlock()
	base := "http://" + r.Host
	if r.TLS != nil {
		base = "https://" + r.Host
	}
	writeJSON(w, 200, map[string]any{
		"issuer":                           base + "/identity",
		"token_endpoint":                   base + "/identity/connect/token",
		"revocation_endpoint":              base + "/identity/connect/revocation",
		"authorization_endpoint":           base + "/identity/connect/authorize",
		"code_challenge_methods_supported": []string{"plain", "S256"},
		"grant_types_supported": []string{"password", "refresh_token",
			"authorization_code", "client_credentials", "implicit", "hybrid"},
	})
}

func newToken(prefix string) string {
	b := make([]byte, 24)
	rand.Read(b)
	return prefix + hex.EncodeToString(b)
}

func writeJSON(w http.ResponseWriter, status int, v any) {
	w.Header().Set("Content-Type", "application/json; charset=utf-8")
	w.Header().Set("Cache-Control", "no-store")
	w.WriteHeader(status)
	json.NewEncoder(w).Encode(v)
}

func oauthError(w http.ResponseWriter, status int, code, desc string) {
	writeJSON(w, status, map[string]string{"error": code, "error_description": desc})
}

func (s *Server) token(w http.ResponseWriter, r *http.Request) {
	if err := r.ParseForm(); err != nil {
		oauthError(w, 400, "invalid_request", "bad form")
		return
	}
	fault := s.arrive(r.PostForm.Get("client_id"))
	defer s.leave(r.PostForm.Get("client_id"))
	if fault != nil && !s.beforeGrant(w, r, fault) {
		return
	}
	if !wait(r, s.opts.Latency) {
		return
	}
	status, body := s.grant(r)
	if !wait(r, s.opts.LatencyAfter) {
		return
	}
	if fault != nil && !s.afterGrant(w, r, fault, status, body) {
		return
	}
	writeJSON(w, status, body)
}

// arrive takes the next queued fault, if any, and counts the request as in
// flight for its client.
func (s *Server) arrive(clientID string) *Fault {
	s.mu.Lock()
	defer s.mu.Unlock()
	var fault *Fault
	if len(s.faults) > 0 {
		f := s.faults[0]
		s.faults = s.faults[1:]
		fault = &f
		s.counts.Faults++
	}
	s.inflight[clientID]++
	s.counts.MaxConcurrentUser = max(s.counts.MaxConcurrentUser, s.inflight[clientID])
	return fault
}

func (s *Server) leave(clientID string) {
	s.mu.Lock()
	defer s.mu.Unlock()
	s.inflight[clientID]--
}

// wait sleeps for d unless the client goes away first; it reports whether
// the request goes on.
func wait(r *http.Request, d time.Duration) bool {
	if d <= 0 {
		return true
	}
	select {
	case <-time.After(d):
		return true
	case <-r.Context().Done():
		return false
	}
}

// beforeGrant plays the part of a fault that comes before the grant is
// processed; it reports whether the grant is processed.
func (s *Server) beforeGrant(w http.ResponseWriter, r *http.Request, fault *Fault) bool {
	if fault.Arrived != nil {
		fault.Arrived <- struct{}{}
	}
	if !wait(r, fault.Delay) {
		return false
	}
	if fault.Hang {
		<-r.Context().Done()
		return false
	}
	if fault.Release != nil {
		select {
		case <-fault.Release:
		case <-r.Context().Done():
			return false
		}
	}
	if fault.Redirect != "" {
		http.Redirect(w, r, fault.Redirect, http.StatusTemporaryRedirect)
		return false
	}
	heldOnly := fault.Release != nil && fault.Status == 0 && !fault.Reset
	if !heldOnly && !fault.Process && fault.Mutate == nil && fault.HoldAfterProcess == 0 {
		s.writeFault(w, fault)
		return false
	}
	return true
}

// afterGrant plays the part of a fault that comes after the grant was
// processed; it reports whether the normal answer is written.
func (s *Server) afterGrant(w http.ResponseWriter, r *http.Request, fault *Fault, status int, body map[string]any) bool {
	if fault.Processed != nil {
		fault.Processed <- struct{}{}
	}
	if !wait(r, fault.HoldAfterProcess) {
		return false
	}
	if fault.Mutate != nil && status == 200 {
		fault.Mutate(body)
	} else if fault.Process {
		s.writeFault(w, fault)
		return false
	}
	return true
}

func (s *Server) writeFault(w http.ResponseWriter, f *Fault) {
	if f.Reset {
		if hj, ok := w.(http.Hijacker); ok {
			if conn, _, err := hj.Hijack(); err == nil {
				conn.Close()
				return
			}
		}
	}
	if f.RetryAfter != "" {
		w.Header().Set("Retry-After", f.RetryAfter)
	}
	ct := f.ContentType
	if ct == "" {
		ct = "application/json"
	}
	w.Header().Set("Content-Type", ct)
	status := f.Status
	if status == 0 {
		status = 500
	}
	w.WriteHeader(status)
	fmt.Fprint(w, f.Body)
}

// grant processes a token request and returns the answer.
func (s *Server) grant(r *http.Request) (int, map[string]any) {
	s.mu.Lock()
	defer s.mu.Unlock()
	f := r.PostForm
	now := s.opts.Now()
	cl, ok := s.clients[f.Get("client_id")]
	if !ok || cl.secret != f.Get("client_secret") || f.Get("client_secret") == "" {
		s.counts.InvalidClient++
		return 400, map[string]any{"error": "invalid_client"}
	}
	switch f.Get("grant_type") {
	case "password":
		s.counts.PasswordGrants++
		if cl.authCode {
			return 400, map[string]any{"error": "unauthorized_client"}
		}
		return s.passwordGrantLocked(f, now)
	case "authorization_code":
		s.counts.CodeGrants++
		return s.codeGrantLocked(f, now)
	case "refresh_token":
		s.counts.RefreshGrants++
		return s.refreshGrantLocked(f, now)
	}
	return 400, map[string]any{"error": "unsupported_grant_type"}
}

// passwordGrantLocked signs the user in: a new session and chain, unless
// the user's concurrent sessions are used up (Acumatica's API Login Limit).
func (s *Server) passwordGrantLocked(f url.Values, now time.Time) (int, map[string]any) {
	u, ok := s.users[f.Get("username")]
	if !ok || u.password != f.Get("password") {
		s.counts.InvalidGrant++
		return 400, map[string]any{"error": "invalid_grant", "error_description": "invalid_username_or_password"}
	}
	if s.opts.MaxSessions > 0 && s.openSessionsLocked(f.Get("username")) >= s.opts.MaxSessions {
		s.counts.LoginLimit++
		return 429, map[string]any{"error": "invalid_grant", "error_description": "API Login Limit"}
	}
	ss := &session{id: newToken("s"), user: f.Get("username"), client: f.Get("client_id"), start: now,
		access: map[string]time.Time{}, chainUsed: map[string]bool{}}
	s.sessions[ss.id] = ss
	return 200, s.issue(ss, strings.Fields(f.Get("scope")), now)
}

func (s *Server) openSessionsLocked(user string) int {
	open := 0
	for _, ss := range s.sessions {
		if ss.user == user && !ss.ended {
			open++
		}
	}
	return open
}

// refreshGrantLocked rotates a chain's refresh token. Presenting a spent
// one is taken for theft (RFC 9700 section 4.14.2): the whole chain is
// revoked and the reuse counted.
func (s *Server) refreshGrantLocked(f url.Values, now time.Time) (int, map[string]any) {
	rt := f.Get("refresh_token")
	ss, ok := s.refresh[rt]
	switch {
	case !ok || ss.client != f.Get("client_id"):
		s.counts.InvalidGrant++
		return 400, map[string]any{"error": "invalid_grant"}
	case ss.chainUsed[rt]:
		s.counts.ReuseDetected++
		s.counts.InvalidGrant++
		ss.ended = true
		return 400, map[string]any{"error": "invalid_grant"}
	case ss.ended,
		now.Sub(ss.lastUse) > s.opts.SlidingLifetime,
		s.opts.AbsoluteLifetime > 0 && now.Sub(ss.start) > s.opts.AbsoluteLifetime:
		s.counts.InvalidGrant++
		return 400, map[string]any{"error": "invalid_grant"}
	}
	ss.chainUsed[rt] = true
	if s.opts.RevokeAccessOnRefresh {
		for a := range ss.access {
			delete(ss.access, a)
		}
	}
	return 200, s.issue(ss, []string{"api", "offline_access"}, now)
}

func (s *Server) issue(ss *session, scopes []string, now time.Time) map[string]any {
	at := newToken("at-")
	ss.access[at] = now.Add(s.opts.AccessTokenLifetime)
	s.access[at] = ss
	ss.lastUse = now
	s.seen = append(s.seen, at)
	body := map[string]any{
		"access_token": at,
		"token_type":   "Bearer",
		"expires_in":   int(s.opts.AccessTokenLifetime / time.Second),
		"scope":        strings.Join(scopes, " "),
	}
	if slices.Contains(scopes, "offline_access") && !s.opts.NoRefreshTokens {
		rt := newToken("rt-")
		ss.refresh = rt
		s.refresh[rt] = ss
		s.seen = append(s.seen, rt)
		body["refresh_token"] = rt
	}
	return body
}

func (s *Server) revocation(w http.ResponseWriter, r *http.Request) {
	r.ParseForm()
	s.mu.Lock()
	defer s.mu.Unlock()
	cl, ok := s.clients[r.PostForm.Get("client_id")]
	if !ok || cl.secret != r.PostForm.Get("client_secret") {
		oauthError(w, 400, "invalid_client", "")
		return
	}
	s.counts.Revocations++
	if ss, ok := s.refresh[r.PostForm.Get("token")]; ok {
		ss.ended = true
	}
	w.WriteHeader(200)
}

func bearer(r *http.Request) string {
	v := r.Header.Get("Authorization")
	if t, ok := strings.CutPrefix(v, "Bearer "); ok {
		return t
	}
	return ""
}

func (s *Server) logout(w http.ResponseWriter, r *http.Request) {
	s.mu.Lock()
	defer s.mu.Unlock()
	s.counts.Logouts++
	if ss, ok := s.access[bearer(r)]; ok {
		ss.ended = true
	}
	w.WriteHeader(http.StatusNoContent)
}

func (s *Server) entity(w http.ResponseWriter, r *http.Request) {
	s.mu.Lock()
	defer s.mu.Unlock()
	s.counts.EntityReads++
	if !s.accessValidLocked(bearer(r)) {
		w.Header().Set("WWW-Authenticate", "Bearer")
		http.Error(w, `{"message":"Authorization has been denied for this request."}`, http.StatusUnauthorized)
		return
	}
	if r.PathValue("endpoint") != "Default" {
		http.NotFound(w, r)
		return
	}
	entity := r.PathValue("entity")
	known := []string{"SalesOrder", "Shipment", "StockItem", "Customer", "Vendor", "PurchaseOrder", "InventoryReceipt"}
	switch {
	case !slices.Contains(known, entity):
		http.NotFound(w, r)
	case !slices.Contains(s.opts.Entities, entity):
		http.Error(w, `{"message":"You have insufficient rights to access the object."}`, http.StatusForbidden)
	default:
		top, _ := strconv.Atoi(r.URL.Query().Get("$top"))
		items := []map[string]any{}
		if top != 0 {
			items = append(items, map[string]any{"id": "00000000-0000-0000-0000-000000000001", "OrderNbr": map[string]string{"value": "SO000001"}})
		}
		writeJSON(w, 200, items)
	}
}
