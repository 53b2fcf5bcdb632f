package storage

import "testing"

func TestInternScopesSharedAndAppendSafe(t *testing.T) {
	a := internScopes([]string{"api", "offline_access"})
	b := internScopes([]string{"api", "offline_access"})
	if &a[0] != &b[0] {
		t.Fatal("equal scope lists are not shared")
	}
	// An append by one holder must not show through the other.
	c := append(a, "extra")
	d := append(b, "other")
	if c[2] != "extra" || d[2] != "other" || len(a) != 2 {
		t.Fatalf("append wrote into the shared list: %q %q", c, d)
	}
	if got := internScopes(nil); got != nil {
		t.Fatalf("internScopes(nil) = %q", got)
	}
	if intern("Bearer") != "Bearer" || intern("") != "" {
		t.Fatal("intern changed a value")
	}
}
