package broker

import (
	"context"
	"fmt"

	"tokenbroker/storage"
)

// maxImportedTokenLen bounds an imported refresh token.
const maxImportedTokenLen = 4096

// ImportRefreshToken brings refreshToken into the connection t names, new
// or existing, of either flow, without a sign-in: one refresh grant proves
// it, and the rotated refresh token it returns is committed (with the
// configuration) before anything is handed out. A token upstream refuses
// stores nothing. For an existing connection the intent is recorded first
// and the old chain is revoked and signed out afterwards.
func (b *Broker) ImportRefreshToken(ctx context.Context, t Target, refreshToken string, validateOnly bool) (*View, error) {
	var v []FieldViolation
	switch {
	case refreshToken == "":
		v = append(v, FieldViolation{Field: "refresh_token", Description: "is required"})
	case len(refreshToken) > maxImportedTokenLen:
		v = append(v, FieldViolation{Field: "refresh_token", Description: fmt.Sprintf("is longer than %d bytes", maxImportedTokenLen)})
	}
	if len(v) > 0 {
		return nil, invalid(v...)
	}
	p, err := b.plan(t)
	if err != nil {
		return nil, err
	}
	if validateOnly {
		return b.preview(p), nil
	}
	if !p.existing {
		return b.createWith(ctx, p.cfg, func(ctx context.Context) (*storage.Tokens, error) {
			return b.redeemRefreshToken(ctx, p.cfg, refreshToken, &storage.Tokens{})
		})
	}
	c, err := b.lookup(p.cfg.Name)
	if err != nil {
		return nil, err
	}
	return b.replaceChain(ctx, c, p.cfg, p.base, grantImport, func(ctx context.Context, intent *storage.Tokens) (*storage.Tokens, error) {
		return b.redeemRefreshToken(ctx, p.cfg, refreshToken, intent)
	})
}

// redeemRefreshToken proves an imported refresh token with one refresh
// grant and returns the token state that continues its chain after prev.
// It never retries: a refresh token may be spent by a request whose answer
// is lost.
func (b *Broker) redeemRefreshToken(ctx context.Context, cfg *storage.Connection, refreshToken string, prev *storage.Tokens) (*storage.Tokens, error) {
	resp, err := b.exchange(ctx, cfg, grantRefresh, refreshToken)
	if err != nil {
		if resp != nil && resp.RefreshToken != "" {
			b.signOutAsync(cfg, resp.RefreshToken, resp.AccessToken)
		}
		return nil, b.grantRefused(cfg.Name, err, ReasonImportRejected,
			"upstream refused the imported refresh token (%s): it lapsed, was revoked or already used, or belongs to another client")
	}
	// RFC 6749 section 6: an answer without a refresh token leaves the
	// presented one valid.
	base := &storage.Tokens{Generation: prev.Generation, RefreshToken: refreshToken}
	// The chain started somewhere else, at a time not known: its start
	// stays unset.
	return rotate(base, cfg, grantRefresh, resp, true, b.now()), nil
}
