package broker

import (
	"errors"
	"strings"
)

// AllTenants is the tenant id that lists every tenant's connections.
const AllTenants = "-"

// ValidID reports whether id is a tenant or connection id: [a-z][a-z0-9-]{0,62}.
func ValidID(id string) bool {
	if len(id) == 0 || len(id) > 63 || id[0] < 'a' || id[0] > 'z' {
		return false
	}
	for i := 1; i < len(id); i++ {
		c := id[i]
		if !(c >= 'a' && c <= 'z' || c >= '0' && c <= '9' || c == '-') {
			return false
		}
	}
	return true
}

// ConnectionName builds `tenants/{tenant}/connections/{connection}`.
func ConnectionName(tenant, connection string) string {
	return "tenants/" + tenant + "/connections/" + connection
}

// ParseConnectionName splits `tenants/{tenant}/connections/{connection}`.
// It does not allocate: it runs on every token request.
func ParseConnectionName(name string) (tenant, connection string, err error) {
	rest, ok := strings.CutPrefix(name, "tenants/")
	if !ok {
		return "", "", errNameForm
	}
	tenant, rest, ok = strings.Cut(rest, "/")
	if !ok {
		return "", "", errNameForm
	}
	connection, ok = strings.CutPrefix(rest, "connections/")
	if !ok || strings.Contains(connection, "/") {
		return "", "", errNameForm
	}
	if !ValidID(tenant) {
		return "", "", errTenantID
	}
	if !ValidID(connection) {
		return "", "", errConnectionID
	}
	return tenant, connection, nil
}

var (
	errNameForm     = errors.New("must have the form tenants/{tenant}/connections/{connection}")
	errTenantID     = errors.New("tenant id must match [a-z][a-z0-9-]{0,62}")
	errConnectionID = errors.New("connection id must match [a-z][a-z0-9-]{0,62}")
)

// ParseParent parses `tenants/{tenant}`; tenant [AllTenants] is allowed when
// allowAll is set.
func ParseParent(parent string, allowAll bool) (tenant string, err error) {
	t, ok := strings.CutPrefix(parent, "tenants/")
	if !ok || strings.Contains(t, "/") {
		return "", errors.New("must have the form tenants/{tenant}")
	}
	if t == AllTenants && allowAll {
		return t, nil
	}
	if !ValidID(t) {
		return "", errors.New("tenant id must match [a-z][a-z0-9-]{0,62}")
	}
	return t, nil
}

// NamePrefix is the storage key prefix of a tenant's connections; empty for
// [AllTenants].
func NamePrefix(tenant string) string {
	if tenant == AllTenants {
		return "tenants/"
	}
	return "tenants/" + tenant + "/connections/"
}
