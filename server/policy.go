package server

import (
	"errors"
	"fmt"
	"path"
	"slices"
	"strings"

	"go.yaml.in/yaml/v3"

	"tokenbroker/broker"
)

// Roles a policy grants.
const (
	// RoleOperator manages connections: create, read, list, update, delete
	// and test them, and use server reflection.
	RoleOperator = "operator"
	// RoleConsumer gets access tokens (and may test connections).
	RoleConsumer = "consumer"
)

// Policy maps caller identities to roles on tenants and connections. It is
// immutable once parsed.
//
// The file is YAML (JSON is valid YAML too):
//
//	rules:
//	  - identities: ["spiffe://corp.example/ops/*"]
//	    role: operator
//	    tenants: ["*"]               # or a list of tenant ids
//	  - identities: ["spiffe://corp.example/svc/orders"]
//	    role: consumer
//	    connections: ["tenants/acme/connections/*"]   # globs on resource names
//	    tenants: ["globex"]          # every connection of these tenants
//
// Identity and connection patterns use path.Match globs: `*` does not cross
// a `/`. In identity patterns `*` matches at least one character, so
// `spiffe://corp.example/ops/*` does not match `spiffe://corp.example/ops/`.
//
// Each identity pattern matches one kind of identity ([Caller]) only: a
// pattern with `://` (or the prefix `uri:`) matches URI SANs, a pattern
// without `:` (or with the prefix `dns:`) DNS SANs, and a pattern with the
// prefix `cn:` the subject CN of a certificate that has no URI or DNS SAN.
// Any other pattern with a colon (`urn:…`) must name its kind with a prefix.
type Policy struct {
	rules []rule
	// The identity patterns, indexed so that a call does not match every
	// rule's patterns: exact ones (no glob metacharacters) by identity, the
	// globs in rule order. Each holds rule indexes.
	exact map[string][]int
	globs []identityGlob
}

type identityGlob struct {
	pattern string
	rule    int
}

type rule struct {
	identities  []string
	role        string
	tenants     []string
	connections []string
}

type policyFile struct {
	Rules []fileRule `yaml:"rules"`
}

// ParsePolicy parses and validates a policy; errors name the line.
func ParsePolicy(data []byte) (*Policy, error) {
	var root yaml.Node
	if err := yaml.Unmarshal(data, &root); err != nil {
		return nil, fmt.Errorf("policy: %w", err)
	}
	if len(root.Content) == 0 {
		return nil, errors.New("policy: empty file; want a rules list")
	}
	var pf policyFile
	dec := root.Content[0]
	if err := dec.Decode(&pf); err != nil {
		return nil, fmt.Errorf("policy: %w", err)
	}
	if err := checkKeys(dec); err != nil {
		return nil, err
	}
	rulesNode := mapValue(dec, "rules")
	if rulesNode == nil || len(pf.Rules) == 0 {
		return nil, fmt.Errorf("policy line %d: no rules", dec.Line)
	}
	p := &Policy{}
	for i, r := range pf.Rules {
		parsed, err := parseRule(r)
		if err != nil {
			return nil, fmt.Errorf("policy line %d (rule %d): %w", rulesNode.Content[i].Line, i+1, err)
		}
		p.rules = append(p.rules, parsed)
	}
	p.index()
	return p, nil
}

// fileRule is a rule as the policy file spells it.
type fileRule struct {
	Identities  []string `yaml:"identities"`
	Role        string   `yaml:"role"`
	Tenants     []string `yaml:"tenants"`
	Connections []string `yaml:"connections"`
}

// parseRule checks one rule of the file and compiles its identity patterns.
func parseRule(r fileRule) (rule, error) {
	if len(r.Identities) == 0 {
		return rule{}, errors.New("identities is required")
	}
	ids := make([]string, 0, len(r.Identities))
	for _, id := range r.Identities {
		pat, err := identityPattern(id)
		if err != nil {
			return rule{}, fmt.Errorf("identity pattern %q %s", id, err.Error())
		}
		ids = append(ids, pat)
	}
	if err := checkGrants(r); err != nil {
		return rule{}, err
	}
	return rule{identities: ids, role: r.Role, tenants: r.Tenants, connections: r.Connections}, nil
}

// checkGrants checks a rule's role and what it grants the role on.
func checkGrants(r fileRule) error {
	switch r.Role {
	case RoleOperator:
		if len(r.Connections) > 0 {
			return errors.New("operators are granted tenants, not connections")
		}
		if len(r.Tenants) == 0 {
			return errors.New(`operator rule needs tenants (["*"] for all)`)
		}
	case RoleConsumer:
		if len(r.Tenants) == 0 && len(r.Connections) == 0 {
			return errors.New("consumer rule needs tenants or connections")
		}
	default:
		return fmt.Errorf("role %q is not operator or consumer", r.Role)
	}
	for _, t := range r.Tenants {
		if t != "*" && !broker.ValidID(t) {
			return fmt.Errorf("tenant %q is not a tenant id or *", t)
		}
	}
	for _, c := range r.Connections {
		if _, err := path.Match(c, ""); err != nil || !strings.HasPrefix(c, "tenants/") {
			return fmt.Errorf("connection pattern %q must be a glob on tenants/{tenant}/connections/{connection}", c)
		}
	}
	return nil
}

// identityPattern turns an identity pattern of a policy file into the form
// matched against [Caller.Key]: prefixed with its kind, and each `*`
// standing for at least one character.
func identityPattern(p string) (string, error) {
	kind, glob := patternKind(p)
	if kind == "" {
		return "", errors.New("has a scheme but no //: name its kind, e.g. uri:" + p)
	}
	if _, err := path.Match(glob, ""); err != nil || glob == "" {
		return "", errors.New("is not a valid glob")
	}
	return kind + ":" + nonEmptyStars(glob), nil
}

// patternKind splits a pattern into the kind of identity it matches and
// its glob; kind is "" when the pattern does not say.
func patternKind(p string) (kind, glob string) {
	if k, rest, ok := strings.Cut(p, ":"); ok && !strings.HasPrefix(rest, "//") {
		switch k {
		case KindURI, KindDNS, KindCN:
			return k, rest
		}
		return "", p
	}
	if strings.Contains(p, "://") {
		return KindURI, p
	}
	return KindDNS, p
}

// nonEmptyStars rewrites each `*` of a glob (outside brackets, unescaped)
// as `?*`, so that it matches one or more characters: a URI with an empty
// last segment must not pass for a name under the prefix.
func nonEmptyStars(glob string) string {
	var b strings.Builder
	inClass := false
	for i := 0; i < len(glob); i++ {
		c := glob[i]
		switch {
		case c == '\\' && i+1 < len(glob):
			b.WriteByte(c)
			i++
			c = glob[i]
		case inClass && c == ']':
			inClass = false
		case !inClass && c == '[':
			inClass = true
		case !inClass && c == '*':
			b.WriteByte('?')
		}
		b.WriteByte(c)
	}
	return b.String()
}

// index builds exact and globs from the rules.
func (p *Policy) index() {
	p.exact = map[string][]int{}
	for i, r := range p.rules {
		for _, id := range r.identities {
			if strings.ContainsAny(id, `*?[\`) {
				p.globs = append(p.globs, identityGlob{pattern: id, rule: i})
			} else if ids := p.exact[id]; len(ids) == 0 || ids[len(ids)-1] != i {
				p.exact[id] = append(ids, i)
			}
		}
	}
}

// anyRule reports whether f holds for a rule that names identity. The
// rules are visited through the index: a map lookup and the glob patterns,
// not every rule.
func (p *Policy) anyRule(identity string, f func(*rule) bool) bool {
	for _, i := range p.exact[identity] {
		if f(&p.rules[i]) {
			return true
		}
	}
	for _, g := range p.globs {
		if ok, _ := path.Match(g.pattern, identity); ok && f(&p.rules[g.rule]) {
			return true
		}
	}
	return false
}

func mapValue(n *yaml.Node, key string) *yaml.Node {
	if n.Kind != yaml.MappingNode {
		return nil
	}
	for i := 0; i+1 < len(n.Content); i += 2 {
		if n.Content[i].Value == key {
			return n.Content[i+1]
		}
	}
	return nil
}

// checkKeys rejects unknown keys (a typo must not silently grant or deny).
func checkKeys(root *yaml.Node) error {
	if root.Kind != yaml.MappingNode {
		return fmt.Errorf("policy line %d: want a mapping with rules", root.Line)
	}
	for i := 0; i+1 < len(root.Content); i += 2 {
		if root.Content[i].Value != "rules" {
			return fmt.Errorf("policy line %d: unknown key %q", root.Content[i].Line, root.Content[i].Value)
		}
	}
	rules := mapValue(root, "rules")
	if rules == nil || rules.Kind != yaml.SequenceNode {
		return fmt.Errorf("policy line %d: rules must be a list", root.Line)
	}
	allowed := []string{"identities", "role", "tenants", "connections"}
	for _, r := range rules.Content {
		if r.Kind != yaml.MappingNode {
			return fmt.Errorf("policy line %d: a rule must be a mapping", r.Line)
		}
		for i := 0; i+1 < len(r.Content); i += 2 {
			if !slices.Contains(allowed, r.Content[i].Value) {
				return fmt.Errorf("policy line %d: unknown key %q (want one of %v)", r.Content[i].Line, r.Content[i].Value, allowed)
			}
		}
	}
	return nil
}

func globAny(patterns []string, s string) bool {
	for _, p := range patterns {
		if ok, _ := path.Match(p, s); ok {
			return true
		}
	}
	return false
}

// manages reports whether r makes its identities operators of tenant.
func (r *rule) manages(tenant string) bool {
	return r.role == RoleOperator && (slices.Contains(r.tenants, "*") || slices.Contains(r.tenants, tenant))
}

// consumes reports whether r lets its identities get tokens of the
// connection name, in tenant.
func (r *rule) consumes(tenant, name string) bool {
	return r.role == RoleConsumer && (slices.Contains(r.tenants, "*") || slices.Contains(r.tenants, tenant) || globAny(r.connections, name))
}

// Known reports whether any rule names the identity, given as
// [Caller.Key] (so are the identities of the methods below).
func (p *Policy) Known(identity string) bool {
	return p.anyRule(identity, func(*rule) bool { return true })
}

// CanManage reports whether identity is an operator of tenant.
func (p *Policy) CanManage(identity, tenant string) bool {
	return p.anyRule(identity, func(r *rule) bool { return r.manages(tenant) })
}

// CanConsume reports whether identity may get tokens of the connection.
func (p *Policy) CanConsume(identity, name string) bool {
	tenant, _, err := broker.ParseConnectionName(name)
	if err != nil {
		return false
	}
	return p.anyRule(identity, func(r *rule) bool { return r.consumes(tenant, name) })
}

// IsOperator reports whether identity is an operator of any tenant.
func (p *Policy) IsOperator(identity string) bool {
	return p.anyRule(identity, func(r *rule) bool { return r.role == RoleOperator })
}
