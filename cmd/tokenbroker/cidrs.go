package main

import (
	"fmt"
	"net/netip"
	"strings"
)

// cidrList is a flag of address ranges, given as a comma-separated list,
// repeatedly, or both. Ranges from the command line replace those from the
// environment, as every flag's value does.
type cidrList struct {
	prefixes []netip.Prefix
	fromEnv  bool // prefixes came from the environment: a flag replaces them
}

func (c *cidrList) String() string {
	parts := make([]string, len(c.prefixes))
	for i, p := range c.prefixes {
		parts[i] = p.String()
	}
	return strings.Join(parts, ",")
}

// Set adds each range of a comma-separated list. A range with host bits
// set is refused rather than widened: 10.1.2.3/8 is more likely a typo for
// 10.1.2.3/32 than a wish for all of 10.0.0.0/8.
func (c *cidrList) Set(v string) error {
	if c.fromEnv {
		c.prefixes, c.fromEnv = nil, false
	}
	for _, part := range strings.Split(v, ",") {
		part = strings.TrimSpace(part)
		if part == "" {
			continue
		}
		p, err := netip.ParsePrefix(part)
		if err != nil {
			return fmt.Errorf("%q is not a CIDR range such as 10.0.0.0/8 or fd00::/8", part)
		}
		if p != p.Masked() {
			return fmt.Errorf("%q has bits set beyond its /%d prefix: write %s for the range, or %s/%d for the one address", part, p.Bits(), p.Masked(), p.Addr(), p.Addr().BitLen())
		}
		c.prefixes = append(c.prefixes, p)
	}
	return nil
}

// Get returns the ranges, making cidrList a flag.Getter.
func (c *cidrList) Get() any { return c.prefixes }

// setFromEnvironment marks the ranges as the environment's, for the
// command line to replace.
func (c *cidrList) setFromEnvironment() { c.fromEnv = true }
