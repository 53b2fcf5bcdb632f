package broker

import (
	"context"
	"crypto/rand"
	"crypto/sha256"
	"encoding/base64"
	"encoding/hex"
	"errors"
	"net/http"
	"net/url"
	"strings"
	"sync"
	"time"

	"tokenbroker/storage"
)

// The Authorization Code flow (RFC 6749 section 4.1) with PKCE (RFC 7636),
// for connections with no integration user: an operator opens the URL
// StartAuthorization returns, the identity server redirects to the
// connection's redirect URI with a code and the state, and
// CompleteAuthorization exchanges the code, with the verifier only the
// broker knows, for the first refresh token of the chain.
//
// Pending authorizations (the configuration to complete and the PKCE
// verifier, under the hash of the state) live in an [AuthorizationStore].
// With replicas that is the shared etcd store, sealed and removed by a
// lease when it expires, so the completion may reach any replica and still
// uses the state once. With one process (bbolt) it is this process's
// memory: the verifier never touches the disk or a backup, and a restart
// loses only authorizations nobody finished yet, which the operator starts
// again (the code is single-use and short-lived upstream anyway).

// Grants and intents of the Authorization Code flow.
const (
	// grantAuthorizationCode is sent to exchange a code, and recorded as
	// the intent before it.
	grantAuthorizationCode = "authorization_code"
	// grantImport is recorded as the intent before the refresh grant that
	// proves an imported refresh token: a crash then leaves the stored
	// chain unspent, unlike the intent of an ordinary refresh.
	grantImport = "import"
	// grantNone: no grant is left to try.
	grantNone = ""
)

// Limits of the flow.
const (
	// AuthorizationLifetime is how long a started authorization may wait
	// for its completion.
	AuthorizationLifetime = 10 * time.Minute
	// maxPendingAuthorizations bounds the authorizations held at once.
	maxPendingAuthorizations = 10000
	// maxCodeLen bounds a code or state taken from a redirect.
	maxCodeLen = 4096
)

// Target names the connection an authorization or an import is for: a new
// one (Existing false: Conn is the whole configuration, Conn.Name the name
// to create) or an existing one (Existing true: Conn.Name, and the Fields
// of Conn to change; ETag, when set, must match).
type Target struct {
	Conn     *storage.Connection
	Existing bool
	Fields   []string
	ETag     string
}

// Authorization is a started Authorization Code flow.
type Authorization struct {
	// URL is where the operator's browser goes; it carries the state and
	// the PKCE challenge.
	URL string
	// ExpireTime is when the authorization can no longer be completed.
	ExpireTime time.Time
	// View is the connection as it will be once completed.
	View *View
}

// AuthorizationStore keeps pending authorizations, each under a key (the
// hash of its state) until taken. TakeAuthorization removes what it
// returns, at once for every replica sharing the store, and answers
// storage.ErrNotFound for a key it does not hold. Implementation: the etcd
// store; the default keeps them in this process's memory.
type AuthorizationStore interface {
	PutAuthorization(ctx context.Context, key string, a *storage.Authorization) error
	TakeAuthorization(ctx context.Context, key string) (*storage.Authorization, error)
}

// errTooManyAuthorizations: the memory store is full.
var errTooManyAuthorizations = errors.New("too many authorizations are waiting for completion")

// memAuthorizations is the default [AuthorizationStore]: this process's
// memory.
type memAuthorizations struct {
	now     func() time.Time
	mu      sync.Mutex                        // guards pending
	pending map[string]*storage.Authorization // key -> authorization
}

// PutAuthorization holds a under key, dropping expired authorizations; it
// fails when too many are pending.
func (m *memAuthorizations) PutAuthorization(_ context.Context, key string, a *storage.Authorization) error {
	m.mu.Lock()
	defer m.mu.Unlock()
	now := m.now()
	for k, p := range m.pending {
		if now.After(p.ExpireTime) {
			delete(m.pending, k)
		}
	}
	if len(m.pending) >= maxPendingAuthorizations {
		return errTooManyAuthorizations
	}
	m.pending[key] = a
	return nil
}

// TakeAuthorization removes and returns the authorization held under key.
func (m *memAuthorizations) TakeAuthorization(_ context.Context, key string) (*storage.Authorization, error) {
	m.mu.Lock()
	defer m.mu.Unlock()
	a, ok := m.pending[key]
	if !ok {
		return nil, storage.ErrNotFound
	}
	delete(m.pending, key)
	return a, nil
}

// stateKey is the key a state's authorization is kept under: its SHA-256,
// so the state itself is kept nowhere but in the URL.
func stateKey(state string) string {
	sum := sha256.Sum256([]byte(state))
	return hex.EncodeToString(sum[:])
}

// takeAuthorization removes the authorization held for state and returns
// it if it is for name and not expired. Any presentation of a state uses
// it up.
func (b *Broker) takeAuthorization(ctx context.Context, name, state string) (*storage.Authorization, error) {
	a, err := b.auths.TakeAuthorization(context.WithoutCancel(ctx), stateKey(state))
	switch {
	case errors.Is(err, storage.ErrNotFound), err == nil && (a.Name != name || b.now().After(a.ExpireTime)):
		return nil, newError(ErrAuthorization, ReasonAuthorizationInvalid, name,
			"the state is unknown, already used, expired or for another connection (authorizations last %v); start the authorization again", AuthorizationLifetime)
	case err != nil:
		return nil, storageError(name, err)
	}
	return a, nil
}

// randomString is n random bytes from crypto/rand, base64url without
// padding: 32 bytes give the 43 characters RFC 7636 section 4.1 asks of a
// verifier, and a state no one can guess.
func randomString(n int) (string, error) {
	b := make([]byte, n)
	if _, err := rand.Read(b); err != nil {
		return "", err
	}
	return base64.RawURLEncoding.EncodeToString(b), nil
}

// s256 is the PKCE S256 challenge of verifier (RFC 7636 section 4.2).
func s256(verifier string) string {
	sum := sha256.Sum256([]byte(verifier))
	return base64.RawURLEncoding.EncodeToString(sum[:])
}

// StartAuthorization checks t and, unless validateOnly, holds a new state
// and PKCE verifier for it (in the [AuthorizationStore]) and returns the
// URL to open. The connection is not stored or changed until
// [Broker.CompleteAuthorization] succeeds.
func (b *Broker) StartAuthorization(ctx context.Context, t Target, validateOnly bool) (*Authorization, error) {
	p, err := b.plan(t)
	if err != nil {
		return nil, err
	}
	if !isAuthCode(p.cfg) {
		return nil, invalid(FieldViolation{Field: "connection.flow", Description: "StartAuthorization is for FLOW_AUTHORIZATION_CODE connections; a password connection signs in with its username and password"})
	}
	out := &Authorization{View: b.preview(p)}
	if validateOnly {
		return out, nil
	}
	state, err1 := randomString(32)
	verifier, err2 := randomString(32)
	if err := errors.Join(err1, err2); err != nil {
		return nil, err
	}
	pa := &storage.Authorization{Name: p.cfg.Name, Conn: p.cfg, Existing: p.existing, ETag: p.base,
		Verifier: verifier, ExpireTime: b.now().Add(AuthorizationLifetime)}
	if err := b.auths.PutAuthorization(context.WithoutCancel(ctx), stateKey(state), pa); err != nil {
		if errors.Is(err, errTooManyAuthorizations) {
			return nil, newError(ErrUpstreamUnavailable, ReasonUpstreamUnavailable, p.cfg.Name, "%v; try again in a few minutes", err)
		}
		return nil, storageError(p.cfg.Name, err)
	}
	ep := b.up.endpointsFor(ctx, p.cfg.InstanceURL)
	out.URL = authorizationURL(ep.authorize, p.cfg, state, s256(verifier))
	out.ExpireTime = pa.ExpireTime
	b.log.Info("authorization started", "connection", p.cfg.Name, "expires", pa.ExpireTime)
	return out, nil
}

// authorizationURL is the authorization request of RFC 6749 section 4.1.1
// with the PKCE challenge of RFC 7636 section 4.3.
func authorizationURL(endpoint string, cfg *storage.Connection, state, challenge string) string {
	q := url.Values{
		"response_type":         {"code"},
		"client_id":             {cfg.ClientID},
		"redirect_uri":          {cfg.RedirectURI},
		"scope":                 {strings.Join(cfg.Scopes, " ")},
		"state":                 {state},
		"code_challenge":        {challenge},
		"code_challenge_method": {"S256"},
	}
	sep := "?"
	if strings.Contains(endpoint, "?") {
		sep = "&"
	}
	return endpoint + sep + q.Encode()
}

// CompleteAuthorization exchanges code for the authorization started for
// name under state and commits the new chain before returning: a new
// connection is created, an existing one gets the new chain (and the
// fields its start named). A wrong, used or expired state, or a code
// upstream refuses, stores nothing.
func (b *Broker) CompleteAuthorization(ctx context.Context, name, state, code string) (*View, error) {
	if v := checkRedirectParams(state, code); len(v) > 0 {
		return nil, invalid(v...)
	}
	p, err := b.takeAuthorization(ctx, name, state)
	if err != nil {
		return nil, err
	}
	if !p.Existing {
		return b.createWith(ctx, p.Conn, func(ctx context.Context) (*storage.Tokens, error) {
			return b.redeemCode(ctx, p.Conn, code, p.Verifier, &storage.Tokens{})
		})
	}
	c, err := b.lookup(name)
	if err != nil {
		return nil, err
	}
	return b.replaceChain(ctx, c, p.Conn, p.ETag, grantAuthorizationCode, func(ctx context.Context, intent *storage.Tokens) (*storage.Tokens, error) {
		return b.redeemCode(ctx, p.Conn, code, p.Verifier, intent)
	})
}

func checkRedirectParams(state, code string) []FieldViolation {
	var v []FieldViolation
	for _, f := range []struct{ name, val string }{{"state", state}, {"code", code}} {
		switch {
		case f.val == "":
			v = append(v, FieldViolation{Field: f.name, Description: "is required: copy it from the redirect's query"})
		case len(f.val) > maxCodeLen:
			v = append(v, FieldViolation{Field: f.name, Description: "is longer than 4096 bytes"})
		}
	}
	return v
}

// redeemCode exchanges code with verifier and returns the token state that
// starts a new chain after prev.
func (b *Broker) redeemCode(ctx context.Context, cfg *storage.Connection, code, verifier string, prev *storage.Tokens) (*storage.Tokens, error) {
	resp, err := b.exchangeCode(ctx, cfg, code, verifier)
	if err != nil {
		if resp != nil && resp.RefreshToken != "" {
			b.signOutAsync(cfg, resp.RefreshToken, resp.AccessToken)
		}
		return nil, b.grantRefused(cfg.Name, err, ReasonCodeRejected,
			"upstream refused the authorization code (%s): it was used, expired, or issued for another client, redirect URI or verifier; start the authorization again")
	}
	return b.newChain(cfg, prev, resp)
}

// newChain is the token state a proven grant's answer starts after prev,
// or an error (and the chain signed out) when it carries no refresh token.
func (b *Broker) newChain(cfg *storage.Connection, prev *storage.Tokens, resp *tokenResponse) (*storage.Tokens, error) {
	if resp.RefreshToken == "" {
		b.signOutAsync(cfg, "", resp.AccessToken)
		return nil, newError(ErrRefreshTokenMissing, ReasonRefreshTokenMissing, cfg.Name,
			"upstream issued no refresh token: add the offline_access scope on the Connected Application's Scopes tab and request it")
	}
	now := b.now()
	next := rotate(&storage.Tokens{Generation: prev.Generation}, cfg, grantAuthorizationCode, resp, true, now)
	next.ChainStartTime = now
	return next, nil
}

// grantRefused is the error for a refused proof (a code, an imported
// refresh token): upstream's invalid_grant has its own reason and advice,
// other failures are those of any proof.
func (b *Broker) grantRefused(name string, err error, reason, advice string) error {
	var ue *upstreamError
	if errors.As(err, &ue) && ue.class == classInvalidGrant {
		return newError(ErrAuthorization, reason, name, advice, ue)
	}
	return b.proofFailed(name, err)
}

// exchangeCode sends one authorization_code grant (RFC 6749 section 4.1.3,
// RFC 7636 section 4.5).
func (b *Broker) exchangeCode(ctx context.Context, cfg *storage.Connection, code, verifier string) (*tokenResponse, error) {
	release, err := b.slots.acquire(ctx, cfg.InstanceURL)
	if err != nil {
		return nil, &upstreamError{class: classSafe, grant: grantAuthorizationCode, detail: "upstream cap: " + err.Error()}
	}
	defer release()
	ctx = withConnName(ctx, cfg.Name)
	ep := b.up.endpointsFor(ctx, cfg.InstanceURL)
	form := url.Values{
		"grant_type":    {grantAuthorizationCode},
		"code":          {code},
		"redirect_uri":  {cfg.RedirectURI},
		"code_verifier": {verifier},
		"client_id":     {cfg.ClientID},
		"client_secret": {cfg.ClientSecret},
	}
	b.stats.UpstreamCode.Add(1)
	began := time.Now()
	ctx, span := startUpstream(ctx, b.up.tracer, "token", http.MethodPost, attrGrant.String(grantAuthorizationCode))
	resp, err := b.up.tokenRequest(ctx, ep.token, form, []string{cfg.ClientSecret, code, verifier})
	endToken(span, err)
	b.observe(grantAuthorizationCode, began, err)
	return resp, err
}

// observe counts one upstream token request's outcome.
func (b *Broker) observe(grant string, began time.Time, err error) {
	outcome := "ok"
	var ue *upstreamError
	if errors.As(err, &ue) {
		outcome = ue.class.String()
	}
	if err != nil {
		b.stats.UpstreamFailures.Add(1)
	}
	b.opts.Observer.TokenRequest(grant, outcome, time.Since(began))
}

// A suspect chain: after a crash during a refresh, a password
// connection gives its refresh token up and signs in again (see
// abandonSpentChain). An authorization-code connection has no password to
// sign in with, so it presents the refresh token once more: if the crash
// came before upstream spent it, the chain goes on and no operator is
// needed; if upstream had spent it, the answer is invalid_grant (and an
// identity server with reuse detection revokes the chain, which the lost
// answer had already made useless), and the connection needs
// authorization, as it would without the retry.

// authorizationRequired halts an authorization-code connection whose chain
// is gone: there is no password to fall back on, so no upstream call is
// made until an operator authorizes it again or imports a refresh token.
func (b *Broker) authorizationRequired(c *conn, tok *storage.Tokens) error {
	msg := "the refresh token chain ended (lapsed, revoked or reused) and a FLOW_AUTHORIZATION_CODE connection has no password; authorize it again or import a refresh token"
	next := halted(tok, ReasonAuthorizationRequired, msg, b.now())
	c.mu.Lock()
	suspect := c.rt.recovering
	c.mu.Unlock()
	if suspect {
		// The chain was spent by a refresh whose answer a crash lost: the
		// access token held may have been revoked with it, so it is not
		// served either.
		next.AccessToken, next.AccessTokenExpireTime = "", time.Time{}
	}
	_ = b.commit(c, next, false)
	b.log.Error("refresh token chain ended; connection needs authorization", "connection", c.name, "reason", ReasonAuthorizationRequired)
	return haltedError(c.name, StateNeedsReauth, ReasonAuthorizationRequired)
}

// authCode reports whether c is an authorization-code connection.
func (c *conn) authCode() bool {
	c.mu.Lock()
	defer c.mu.Unlock()
	return isAuthCode(c.cfg)
}

// authCodeUpdateRefused is the error for an UpdateConnection of an
// authorization-code connection that names a field a password grant would
// prove: without a password, the proof is a new chain, which
// StartAuthorization or ImportRefreshToken make with the same field mask.
func authCodeUpdateRefused(cfg *storage.Connection, u *update) error {
	if !isAuthCode(cfg) || !u.proof {
		return nil
	}
	return invalid(FieldViolation{Field: "update_mask",
		Description: "on a FLOW_AUTHORIZATION_CODE connection, instance_url, client_id, client_secret and scopes change with StartAuthorization or ImportRefreshToken and the same update_mask, which prove them upstream"})
}

// plan is a checked [Target]: the configuration once done.
type plan struct {
	cfg      *storage.Connection
	existing bool
	base     string // existing: the etag of the configuration cfg was built from
	tokens   *storage.Tokens
}

// plan checks t as CreateConnection (new) or UpdateConnection (existing)
// would, without contacting upstream or storing anything.
func (b *Broker) plan(t Target) (*plan, error) {
	if t.Conn == nil {
		return nil, invalid(FieldViolation{Field: "connection", Description: "is required"})
	}
	if !t.Existing {
		return b.planNew(t.Conn)
	}
	c, err := b.lookup(t.Conn.Name)
	if err != nil {
		return nil, err
	}
	u, err := newUpdate(t.Conn, t.Fields, t.ETag)
	if err != nil {
		return nil, err
	}
	c.mu.Lock()
	deleted, cur, tok := c.deleted, c.cfg.Clone(), c.committed.Clone()
	c.mu.Unlock()
	switch {
	case deleted:
		return nil, notFound(c.name)
	case u.etag != "" && u.etag != etag(cur):
		return nil, newError(ErrConflict, ReasonEtagMismatch, c.name, "etag %s does not match the current %s; read the connection again", u.etag, etag(cur))
	}
	next := cur.Clone()
	if next.Flow == "" {
		next.Flow = FlowPassword
	}
	applyFields(next, u.patch, u.fields)
	if v := Normalize(next, u.fields, b.opts.upstreamRules()); len(v) > 0 {
		return nil, invalid(v...)
	}
	return &plan{cfg: next, existing: true, base: etag(cur), tokens: tok}, nil
}

func (b *Broker) planNew(in *storage.Connection) (*plan, error) {
	c := in.Clone()
	if v := Normalize(c, nil, b.opts.upstreamRules()); len(v) > 0 {
		return nil, invalid(v...)
	}
	if _, _, err := ParseConnectionName(c.Name); err != nil {
		return nil, invalid(FieldViolation{Field: "name", Description: err.Error()})
	}
	if _, err := b.lookup(c.Name); err == nil {
		return nil, alreadyExists(c.Name, "")
	}
	now := b.now()
	c.CreateTime, c.UpdateTime = now, now
	return &plan{cfg: c, tokens: &storage.Tokens{State: string(StateActive)}}, nil
}

// preview is the view of p's connection as it will be.
func (b *Broker) preview(p *plan) *View {
	return b.viewOf(newConnPublished(p.cfg, p.tokens))
}

// createWith creates cfg with the token state prove returns, once: the
// name is reserved while prove talks upstream, and the connection is
// stored with its first chain in one write. A failure stores nothing.
func (b *Broker) createWith(ctx context.Context, cfg *storage.Connection, prove func(context.Context) (*storage.Tokens, error)) (*View, error) {
	if !b.reserve(cfg.Name) {
		return nil, alreadyExists(cfg.Name, "a create is in progress")
	}
	defer b.unreserve(cfg.Name)
	if _, err := b.lookup(cfg.Name); err == nil {
		return nil, alreadyExists(cfg.Name, "")
	}
	tok, err := prove(ctx)
	if err != nil {
		return nil, err
	}
	stored, err := b.store.CreateConnection(context.WithoutCancel(ctx), cfg, tok)
	if err != nil {
		b.signOutAsync(cfg, tok.RefreshToken, tok.AccessToken)
		if errors.Is(err, storage.ErrAlreadyExists) {
			return nil, alreadyExists(cfg.Name, "")
		}
		return nil, storageError(cfg.Name, err)
	}
	nc := newConnPublished(stored, tok)
	_, replaced := b.conns.Swap(cfg.Name, nc)
	b.events.admitted(nc, !replaced) // a watch of another replica's change may have brought it first
	b.tombs.Delete(cfg.Name)
	b.log.Info("connection created", "connection", cfg.Name, "instance_url", cfg.InstanceURL, "flow", cfg.Flow)
	return b.viewOf(nc), nil
}

func (b *Broker) reserve(name string) bool {
	b.creatingMu.Lock()
	defer b.creatingMu.Unlock()
	if _, busy := b.creating[name]; busy {
		return false
	}
	b.creating[name] = struct{}{}
	return true
}

func (b *Broker) unreserve(name string) {
	b.creatingMu.Lock()
	defer b.creatingMu.Unlock()
	delete(b.creating, name)
}

// replaceChain gives the existing connection c the configuration cfg and
// the chain prove makes, in c's turn, if c is still the configuration
// whose etag is base: the intent is recorded first, prove
// talks upstream, and cfg with the new chain is stored in one write before
// anything is handed out. The old chain is then revoked and signed out. A
// failure leaves c as it was (its intent cleared).
func (b *Broker) replaceChain(ctx context.Context, c *conn, cfg *storage.Connection, base string, intentGrant string, prove func(context.Context, *storage.Tokens) (*storage.Tokens, error)) (*View, error) {
	var out *View
	err := b.withTurn(ctx, c, func() error {
		c.mu.Lock()
		deleted, cur, old := c.deleted, c.cfg.Clone(), c.committed.Clone()
		c.mu.Unlock()
		switch {
		case deleted:
			return notFound(c.name)
		case etag(cur) != base: // the etag, not the revision: a re-created connection starts again at 1
			return newError(ErrConflict, ReasonEtagMismatch, c.name, "connection changed since the authorization or import started; start again")
		}
		intent, err := b.recordIntent(c, old, intentGrant)
		if err != nil {
			return err
		}
		next, err := prove(ctx, intent)
		if err != nil {
			_ = b.commit(c, withoutIntent(intent), false)
			return err
		}
		out, err = b.storeChain(ctx, c, cfg, next, old)
		return err
	})
	if err != nil {
		return nil, err
	}
	return out, nil
}

// storeChain stores cfg with the new chain next for c (one write), takes
// both, and revokes and signs out the old chain.
func (b *Broker) storeChain(ctx context.Context, c *conn, cfg *storage.Connection, next, old *storage.Tokens) (*View, error) {
	cfg = cfg.Clone()
	cfg.UpdateTime = b.now()
	stored, err := b.store.UpdateConnection(context.WithoutCancel(ctx), cfg, next)
	if err != nil {
		b.signOutAsync(cfg, next.RefreshToken, next.AccessToken)
		c.mu.Lock()
		intent := c.committed
		c.mu.Unlock()
		_ = b.commit(c, withoutIntent(intent), false)
		return nil, updateError(c.name, err)
	}
	c.mu.Lock()
	c.configLocked(stored)
	c.succeededLocked(next)
	out := b.viewLocked(c)
	c.mu.Unlock()
	if old.RefreshToken != next.RefreshToken {
		b.signOut(ctx, stored, old.RefreshToken, old.AccessToken)
	}
	b.log.Info("connection has a new token chain", "connection", c.name, "flow", cfg.Flow)
	return out, nil
}
