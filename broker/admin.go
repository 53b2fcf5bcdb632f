package broker

import (
	"context"
	"errors"
	"fmt"
	"regexp"
	"slices"
	"time"

	"tokenbroker/storage"
)

// Updatable lists the connection fields an update may name, with whether a
// change must be proven upstream (a password grant with the new values)
// before it replaces the old value.
var Updatable = map[string]bool{
	"display_name":                    false,
	"instance_url":                    true,
	"client_id":                       true,
	"client_secret":                   true,
	"client_secret_expire_time":       false,
	"username":                        true,
	"password":                        true,
	"scopes":                          true,
	"refresh_token_sliding_lifetime":  false,
	"refresh_token_absolute_lifetime": false,
	"redirect_uri":                    false,
}

// Normalize checks and normalizes a connection's input fields in place. With
// fields nil every field is checked as on create (credentials required);
// otherwise only the named ones. It returns one violation per bad field,
// named as in the API.
func Normalize(c *storage.Connection, fields []string, rules UpstreamRules) []FieldViolation {
	has := func(f string) bool { return fields == nil || slices.Contains(fields, f) }
	v := normalizeFlow(c, has)
	for _, fc := range fieldChecks(c) {
		if !has(fc.field) {
			continue
		}
		if err := fc.check(c, rules); err != nil {
			v = append(v, FieldViolation{Field: fc.field, Description: err.Error()})
		}
	}
	return v
}

// fieldCheck checks one input field of a connection, normalizing it in
// place where it has a canonical form.
type fieldCheck struct {
	field string // as named in the API
	check func(c *storage.Connection, rules UpstreamRules) error
}

// fieldChecks are the checks of c's fields, in the order their violations
// are reported; which credentials are required depends on c's flow.
func fieldChecks(c *storage.Connection) []fieldCheck {
	checks := []fieldCheck{
		{"display_name", func(c *storage.Connection, _ UpstreamRules) error { return ValidateDisplayName(c.DisplayName) }},
		{"instance_url", normalizeInstanceURLField},
		{"client_id", func(c *storage.Connection, _ UpstreamRules) error { return ValidateClientID(c.ClientID) }},
	}
	for _, f := range requiredCredentials(c) {
		checks = append(checks, fieldCheck{f.name, func(*storage.Connection, UpstreamRules) error { return ValidateSecretField(f.val) }})
	}
	return append(checks,
		fieldCheck{"scopes", normalizeScopesField},
		fieldCheck{"refresh_token_sliding_lifetime", checkSlidingLifetime},
		fieldCheck{"refresh_token_absolute_lifetime", checkAbsoluteLifetime},
	)
}

// normalizeInstanceURLField puts the instance URL in its canonical form and
// checks that its address is one the rules let requests reach.
func normalizeInstanceURLField(c *storage.Connection, rules UpstreamRules) error {
	u, err := NormalizeInstanceURL(c.InstanceURL, rules.AllowInsecure)
	if err == nil {
		err = CheckInstanceAddress(u, rules)
	}
	if err == nil {
		c.InstanceURL = u
	}
	return err
}

// normalizeScopesField gives a connection without scopes the default ones,
// then checks them.
func normalizeScopesField(c *storage.Connection, _ UpstreamRules) error {
	if len(c.Scopes) == 0 {
		c.Scopes = slices.Clone(DefaultScopes)
	}
	return ValidateScopes(c.Scopes)
}

// checkSlidingLifetime checks the refresh token's sliding lifetime: 0 for
// the default, else a span Acumatica can be set to.
func checkSlidingLifetime(c *storage.Connection, _ UpstreamRules) error {
	if d := c.SlidingLifetime; d != 0 && (d < time.Hour || d > 3650*24*time.Hour) {
		return errors.New("must be 0 (default 15 days) or between 1 hour and 3650 days")
	}
	return nil
}

// checkAbsoluteLifetime checks the chain's absolute lifetime: 0 for none.
func checkAbsoluteLifetime(c *storage.Connection, _ UpstreamRules) error {
	if d := c.AbsoluteLifetime; d != 0 && (d < 24*time.Hour || d > 3650*24*time.Hour) {
		return errors.New("must be 0 (infinite) or between 1 day and 3650 days")
	}
	return nil
}

var (
	entityPattern   = regexp.MustCompile(`^[A-Za-z][A-Za-z0-9_]{0,63}$`)
	endpointPattern = regexp.MustCompile(`^[A-Za-z][A-Za-z0-9_]{0,63}/[0-9]{1,4}\.[0-9]{1,4}\.[0-9]{1,4}$`)
)

// DefaultEndpoint is the contract-based endpoint TestConnection reads.
const DefaultEndpoint = "Default/24.200.001"

// ValidEntity reports whether s is a contract-based API entity name.
func ValidEntity(s string) bool { return entityPattern.MatchString(s) }

// ValidEndpoint reports whether s is `Name/Version`, e.g. Default/24.200.001.
func ValidEndpoint(s string) bool { return endpointPattern.MatchString(s) }

// CreateConnection registers c. Unless validateOnly, the credentials are
// proven with one password grant whose refresh token starts the chain;
// rejected credentials store nothing.
func (b *Broker) CreateConnection(ctx context.Context, c *storage.Connection, validateOnly bool) (*View, error) {
	c, err := b.checkNew(c)
	if err != nil {
		return nil, err
	}
	if !b.reserve(c.Name) {
		return nil, alreadyExists(c.Name, "a create is in progress")
	}
	defer b.unreserve(c.Name)

	now := b.now()
	c.CreateTime, c.UpdateTime = now, now
	if validateOnly {
		return b.viewOf(newConnPublished(c, &storage.Tokens{State: string(StateActive)})), nil
	}
	if isAuthCode(c) {
		return nil, invalid(FieldViolation{Field: "connection.flow", Description: "a FLOW_AUTHORIZATION_CODE connection is created by StartAuthorization and CompleteAuthorization, or by ImportRefreshToken (validate_only may check it here)"})
	}
	tok, err := b.prove(ctx, c, &storage.Tokens{})
	if err != nil {
		return nil, err
	}
	return b.storeCreated(ctx, c, tok)
}

// checkNew returns a normalized copy of in, the configuration of a new
// connection, once it is valid and its name is free.
func (b *Broker) checkNew(in *storage.Connection) (*storage.Connection, error) {
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
	return c, nil
}

// prove runs one password grant with cfg's credentials and returns the
// token state that starts a new chain after prev. It never retries: a
// rejected password must not be sent twice.
func (b *Broker) prove(ctx context.Context, cfg *storage.Connection, prev *storage.Tokens) (*storage.Tokens, error) {
	resp, err := b.exchange(ctx, cfg, grantPassword, "")
	if err != nil {
		if resp != nil && resp.RefreshToken != "" {
			b.signOutAsync(cfg, resp.RefreshToken, resp.AccessToken)
		}
		return nil, b.proofFailed(cfg.Name, err)
	}
	if resp.RefreshToken == "" {
		b.signOutAsync(cfg, "", resp.AccessToken)
		return nil, newError(ErrRefreshTokenMissing, ReasonRefreshTokenMissing, cfg.Name,
			"upstream issued no refresh token: add the offline_access scope on the Connected Application's Scopes tab and request it")
	}
	return rotate(&storage.Tokens{Generation: prev.Generation}, cfg, grantPassword, resp, true, b.now()), nil
}

// proofFailed is the error for a failed proof of credentials: how long to
// wait is the proof's own (it is never retried), the rest is the failure's.
func (b *Broker) proofFailed(name string, err error) error {
	var ue *upstreamError
	if !errors.As(err, &ue) {
		return err
	}
	wait := max(ue.retryAfter, b.opts.BackoffBase)
	if ue.class == classLoginLimit {
		wait = max(ue.retryAfter, b.opts.LoginLimitBackoff)
	}
	e := ue.toError(name, wait)
	if errors.Is(e, ErrUpstreamUnavailable) {
		e.Message = "could not verify the credentials: " + e.Message
	}
	return e
}

// GetConnection returns a connection's view.
func (b *Broker) GetConnection(_ context.Context, name string) (*View, error) {
	c, err := b.lookup(name)
	if err != nil {
		return nil, err
	}
	return b.viewOf(c), nil
}

// ListConnections returns up to limit connections with names starting with
// prefix after the name after, that allow (nil: all) accepts, and the name
// to continue after ("" at the end).
func (b *Broker) ListConnections(ctx context.Context, prefix, after string, limit int, allow func(name string) bool) ([]*View, string, error) {
	views := make([]*View, 0, min(limit, 64))
	for {
		recs, err := b.store.ListConnections(ctx, prefix, after, limit+1)
		if err != nil {
			return nil, "", storageError("", err)
		}
		for _, r := range recs {
			if allow != nil && !allow(r.Name) {
				after = r.Name
				continue
			}
			c, err := b.lookup(r.Name)
			if err != nil {
				after = r.Name
				continue
			}
			if len(views) == limit {
				// One more exists beyond this page.
				return views, views[len(views)-1].Conn.Name, nil
			}
			views = append(views, b.viewOf(c))
			after = r.Name
		}
		if len(recs) <= limit {
			return views, "", nil
		}
	}
}

// UpdateConnection applies the named fields of patch. A change to a
// credential is proven with one password grant before it replaces the old
// value; the old chain is then revoked and signed out. etag, when set, must
// match.
func (b *Broker) UpdateConnection(ctx context.Context, name string, patch *storage.Connection, fields []string, etagIn string, validateOnly bool) (*View, error) {
	c, err := b.lookup(name)
	if err != nil {
		return nil, err
	}
	u, err := newUpdate(patch, fields, etagIn)
	if err != nil {
		return nil, err
	}
	var out *View
	err = b.withTurn(ctx, c, func() (err error) {
		out, err = b.update(ctx, c, u, validateOnly)
		return err
	})
	if err != nil {
		return nil, err
	}
	return out, nil
}

// update is an UpdateConnection request, checked.
type update struct {
	patch  *storage.Connection
	fields []string
	etag   string
	proof  bool // a named field must be proven upstream
}

// newUpdate checks the request's field mask and etag.
func newUpdate(patch *storage.Connection, fields []string, etagIn string) (*update, error) {
	u := &update{patch: patch, fields: fields, etag: etagIn}
	var v []FieldViolation
	for _, f := range fields {
		needs, ok := Updatable[f]
		if !ok {
			v = append(v, FieldViolation{Field: "update_mask", Description: fmt.Sprintf("field %q cannot be updated", f)})
		}
		u.proof = u.proof || needs
	}
	if etagIn != "" {
		if _, ok := ParseETag(etagIn); !ok {
			v = append(v, FieldViolation{Field: "etag", Description: "is not an etag this service issued"})
		}
	}
	if len(v) > 0 {
		return nil, invalid(v...)
	}
	return u, nil
}

// update applies u to c. The caller holds c's turn.
func (b *Broker) update(ctx context.Context, c *conn, u *update, validateOnly bool) (*View, error) {
	c.mu.Lock()
	deleted, cur, tok, pending := c.deleted, c.cfg.Clone(), c.committed.Clone(), c.rt.pending
	c.mu.Unlock()
	if deleted {
		return nil, notFound(c.name)
	}
	if u.etag != "" && u.etag != etag(cur) {
		return nil, newError(ErrConflict, ReasonEtagMismatch, c.name, "etag %s does not match the current %s; read the connection again", u.etag, etag(cur))
	}
	next := cur.Clone()
	if next.Flow == "" {
		next.Flow = FlowPassword // a record written before flows existed
	}
	applyFields(next, u.patch, u.fields)
	if v := Normalize(next, u.fields, b.opts.upstreamRules()); len(v) > 0 {
		return nil, invalid(v...)
	}
	if err := authCodeUpdateRefused(next, u); err != nil {
		return nil, err
	}
	if validateOnly {
		return b.viewOf(newConnPublished(next, tok)), nil
	}
	var newTok *storage.Tokens
	if u.proof {
		var err error
		if newTok, err = b.prove(ctx, next, tok); err != nil {
			return nil, err
		}
	}
	next.UpdateTime = b.now()
	stored, err := b.store.UpdateConnection(ctx, next, newTok)
	if err != nil {
		if newTok != nil {
			b.signOutAsync(next, newTok.RefreshToken, newTok.AccessToken)
		}
		return nil, updateError(c.name, err)
	}
	c.mu.Lock()
	c.configLocked(stored)
	if newTok != nil {
		c.succeededLocked(newTok)
	}
	out := b.viewLocked(c)
	c.mu.Unlock()
	if newTok != nil {
		// Sign the old chain out before returning, so that when the update
		// is answered the old session's seat is free.
		b.signOut(ctx, cur, tok.RefreshToken, tok.AccessToken)
		if pending != nil && pending.RefreshToken != tok.RefreshToken {
			b.signOut(ctx, cur, pending.RefreshToken, pending.AccessToken)
		}
	}
	b.log.Info("connection updated", "connection", c.name, "fields", u.fields, "proven_upstream", newTok != nil)
	return out, nil
}

// updateError is the error for a failed write of an update.
func updateError(name string, err error) error {
	switch {
	case errors.Is(err, storage.ErrConflict):
		return newError(ErrConflict, ReasonEtagMismatch, name, "connection changed concurrently; read it again")
	case errors.Is(err, storage.ErrNotFound):
		return notFound(name)
	}
	return storageError(name, err)
}

func applyFields(dst, src *storage.Connection, fields []string) {
	for _, f := range fields {
		switch f {
		case "display_name":
			dst.DisplayName = src.DisplayName
		case "instance_url":
			dst.InstanceURL = src.InstanceURL
		case "client_id":
			dst.ClientID = src.ClientID
		case "client_secret":
			dst.ClientSecret = src.ClientSecret
		case "client_secret_expire_time":
			dst.ClientSecretExpireTime = src.ClientSecretExpireTime
		case "username":
			dst.Username = src.Username
		case "password":
			dst.Password = src.Password
		case "scopes":
			dst.Scopes = slices.Clone(src.Scopes)
		case "refresh_token_sliding_lifetime":
			dst.SlidingLifetime = src.SlidingLifetime
		case "refresh_token_absolute_lifetime":
			dst.AbsoluteLifetime = src.AbsoluteLifetime
		case "redirect_uri":
			dst.RedirectURI = src.RedirectURI
		}
	}
}
