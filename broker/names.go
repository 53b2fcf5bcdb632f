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
func ParseConnectionName(name string) (tenant, connection string, err error) {
	parts := strings.Split(name, "/")
	if len(parts) != 4 || parts[0] != "tenants" || parts[2] != "connections" {
		return "", "", errors.New("must have the form tenants/{tenant}/connections/{connection}")
	}
	if !ValidID(parts[1]) {
		return "", "", errors.New("tenant id must match [a-z][a-z0-9-]{0,62}")
	}
	if !ValidID(parts[3]) {
		return "", "", errors.New("connection id must match [a-z][a-z0-9-]{0,62}")
	}
	return parts[1], parts[3], nil
}

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
