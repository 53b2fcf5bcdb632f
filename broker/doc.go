// Package broker holds tokenbroker's connections and their OAuth 2.0 token
// chains against Acumatica's identity server.
//
// It serves cached access tokens without I/O or shared locks, serializes
// every upstream token request of one connection (at most one at any moment),
// commits each rotated refresh token to the [Store] before anyone sees the
// access token it came with, records its intent before every irreversible
// upstream call, refreshes in-use tokens before they expire and idle chains
// before their sliding window lapses, and stops calling upstream for a
// connection whose credentials were rejected. A connection signs in with
// the password flow, or with the Authorization Code flow with PKCE
// ([Broker.StartAuthorization], [Broker.CompleteAuthorization]) or an
// imported refresh token ([Broker.ImportRefreshToken]); the latter uses
// refresh grants only and halts when its chain dies. With a [Locker] and a
// [Watcher] (the etcd store) several replicas share connections: upstream
// calls are serialized across them and each keeps the others' tokens.
//
// This package must never import gRPC or the API messages, never log or
// return a secret or token in an error, and never follow a redirect from a
// token endpoint.
package broker
