package main

import (
	"io"
	"strings"
	"testing"
)

func TestAllowUpstreamCIDRFlag(t *testing.T) {
	env := func(vars map[string]string) func(string) string { return func(k string) string { return vars[k] } }
	cfg, err := parseConfig([]string{"--allow-upstream-cidr", "10.0.0.0/8, 192.168.7.0/24", "--allow-upstream-cidr", "fd00::/8"}, env(nil), io.Discard)
	if err != nil {
		t.Fatal(err)
	}
	if got := cfg.allowUpstreamCIDRs.String(); got != "10.0.0.0/8,192.168.7.0/24,fd00::/8" {
		t.Errorf("ranges = %s", got)
	}
	cfg, err = parseConfig(nil, env(map[string]string{"TOKENBROKER_ALLOW_UPSTREAM_CIDR": "172.16.0.0/12"}), io.Discard)
	if err != nil || cfg.allowUpstreamCIDRs.String() != "172.16.0.0/12" {
		t.Errorf("from the environment: %v %v", cfg, err)
	}
	// The command line replaces the environment's ranges, as for every flag.
	cfg, err = parseConfig([]string{"--allow-upstream-cidr", "10.9.0.0/16"}, env(map[string]string{"TOKENBROKER_ALLOW_UPSTREAM_CIDR": "10.0.0.0/8"}), io.Discard)
	if err != nil || cfg.allowUpstreamCIDRs.String() != "10.9.0.0/16" {
		t.Errorf("flag over environment: %v %v, want only 10.9.0.0/16", cfg, err)
	}
	for arg, want := range map[string]string{
		"10.0.0.0":    "not a CIDR range",
		"10.1.2.3/8":  "write 10.0.0.0/8 for the range, or 10.1.2.3/32",
		"intranet/16": "not a CIDR range",
	} {
		if _, err := parseConfig([]string{"--allow-upstream-cidr", arg}, env(nil), io.Discard); err == nil || !strings.Contains(err.Error(), want) {
			t.Errorf("--allow-upstream-cidr %s: %v, want %q", arg, err, want)
		}
	}
}
