// Package acumaticatest is a stand-in for an Acumatica ERP instance's
// identity server and a sliver of its REST API, for tests and local runs.
//
// It implements what tokenbroker relies on: `/identity/connect/token` with
// the password and refresh_token grants (client credentials in the form
// body), one-time refresh tokens with reuse detection that revokes the whole
// chain, sliding and absolute refresh token lifetimes, a per-user limit on
// concurrent sessions answered with "API Login Limit", `invalid_grant` and
// `invalid_client`, the Authorization Code flow (`/identity/connect/authorize`
// with PKCE S256 required, auto-consent for one configured user, exact
// redirect URI matching, single-use codes that expire within a minute, and
// the authorization_code grant), discovery, revocation, `/entity/auth/logout`, and a
// protected `/entity/Default/24.200.001/{Entity}` resource. Faults (429 with
// Retry-After, 5xx, HTML bodies, slow answers, resets, malformed 200s,
// redirects) are injected with [Server.Inject], or over HTTP under
// `/_control/` when run as cmd/fakeacumatica.
//
// It counts every request so tests can assert upstream economy. It must
// never be used as a real identity server: it keeps everything in memory
// and its control endpoints are unauthenticated.
package acumaticatest
