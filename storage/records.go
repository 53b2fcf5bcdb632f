package storage

import "time"

// Connection is a connection's configuration and credentials. ClientSecret
// and Password are plaintext in memory only; the store seals them.
type Connection struct {
	Name                   string
	DisplayName            string
	InstanceURL            string
	ClientID               string
	ClientSecret           string
	Username               string
	Password               string
	Scopes                 []string
	ClientSecretExpireTime time.Time
	SlidingLifetime        time.Duration
	AbsoluteLifetime       time.Duration
	CreateTime             time.Time
	UpdateTime             time.Time
	// Revision is set by the store: 1 on create, +1 on every update.
	Revision int64
	// DeleteTime is set while a delete is in progress (see the stores'
	// MarkDeleting): reads treat the connection as gone, and LoadAll
	// reports it so that an interrupted delete is finished.
	DeleteTime time.Time
	// Flow is how the connection signs in: [FlowPassword] (also "") or
	// [FlowAuthorizationCode], which has no username or password.
	Flow string
	// RedirectURI is the registered redirect URI of an authorization-code
	// connection.
	RedirectURI string
}

// Flows of a connection.
const (
	FlowPassword          = "password"
	FlowAuthorizationCode = "authorization_code"
)

// Tokens is a connection's token chain state. RefreshToken and AccessToken
// are plaintext in memory only; the store seals them.
type Tokens struct {
	// Generation counts changes of the refresh token: each new one committed
	// and each given up, so replicas can tell the newer record.
	Generation            int64
	RefreshToken          string
	AccessToken           string
	TokenType             string
	AccessTokenExpireTime time.Time
	IssueTime             time.Time
	ChainStartTime        time.Time
	RefreshTokenUseTime   time.Time
	Scopes                []string
	State                 string
	StateReason           string
	LastErrorCode         string
	LastErrorMessage      string
	LastErrorTime         time.Time
	// Intent, when IntentGrant is set, records that an upstream token request
	// for IntentGeneration was about to be sent and its outcome is unknown.
	IntentGeneration int64
	IntentGrant      string
	IntentTime       time.Time
}

// Authorization is an Authorization Code flow started and not yet
// completed: the configuration it completes and the PKCE verifier, which is
// plaintext in memory only; the store seals it.
type Authorization struct {
	Name     string
	Conn     *Connection
	Existing bool
	// ETag is, for an existing connection, the etag of the configuration
	// Conn was built from: a re-created connection starts its revisions
	// again, and its etag differs.
	ETag       string
	Verifier   string
	ExpireTime time.Time
}

// Clone returns a deep copy.
func (c *Connection) Clone() *Connection {
	if c == nil {
		return nil
	}
	cp := *c
	cp.Scopes = append([]string(nil), c.Scopes...)
	return &cp
}

// Clone returns a deep copy.
func (t *Tokens) Clone() *Tokens {
	if t == nil {
		return nil
	}
	cp := *t
	cp.Scopes = append([]string(nil), t.Scopes...)
	return &cp
}

// Change is one change in the change feed of a store shared by replicas.
// Exactly one of Connection, Tokens or Deleted describes it.
type Change struct {
	Name       string
	Connection *Connection // the connection's configuration changed
	Tokens     *Tokens     // the token state changed
	Deleted    bool        // the connection was deleted
}
