package storage

import (
	"strings"
	"sync"
	"unique"
)

// Decoding 100,000 records would otherwise keep 100,000 copies of the same
// few values ("Bearer", "ACTIVE", a tenant's client id, the scope list).
// Interned values are shared, so they must never be modified in place; every
// Scopes slice handed out by the store is read-only (Clone copies it).

// intern returns the canonical copy of a short, often repeated string.
func intern(s string) string {
	if s == "" {
		return ""
	}
	return unique.Make(s).Value()
}

// maxScopeSets bounds the scope-list cache; sets past it are not shared.
const maxScopeSets = 1024

var scopeSets struct {
	sync.Mutex
	m map[string][]string
}

// internScopes returns a shared copy of a scope list.
func internScopes(scopes []string) []string {
	if len(scopes) == 0 {
		return nil
	}
	key := strings.Join(scopes, " ")
	scopeSets.Lock()
	defer scopeSets.Unlock()
	if s, ok := scopeSets.m[key]; ok {
		return s
	}
	if scopeSets.m == nil {
		scopeSets.m = map[string][]string{}
	}
	if len(scopeSets.m) >= maxScopeSets {
		return scopes
	}
	s := make([]string, len(scopes))
	for i, v := range scopes {
		s[i] = intern(v)
	}
	s = s[:len(s):len(s)] // an append never writes into the shared array
	scopeSets.m[key] = s
	return s
}
