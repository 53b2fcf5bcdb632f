package main

import (
	"flag"
	"io"
	"strings"
	"testing"
	"time"
)

// Every numeric flag is checked against its range at start, on the command
// line and in the environment alike, and the refusal names the flag and
// the range in one line.
func TestNumericFlagRanges(t *testing.T) {
	type bad struct{ value, want string }
	for _, tc := range []struct {
		flag string
		ok   []string // accepted, the bounds among them
		bad  []bad
	}{
		{"rate-limit", []string{"0", "0.5", "200", "1000000"}, []bad{
			{"-5", "--rate-limit must not be negative, not -5 (allowed: 0 to 1000000; 0: no limit)"},
			{"-0.001", "--rate-limit must not be negative"},
			{"1000001", "--rate-limit must be at most 1000000, not 1000001"},
			{"NaN", "--rate-limit must be a number, not NaN (allowed: 0 to 1000000"},
			{"Inf", "--rate-limit must be at most 1000000, not +Inf"},
		}},
		{"rate-burst", []string{"0", "1", "2000000"}, []bad{
			{"-1", "--rate-burst must not be negative, not -1 (allowed: 0 to 2000000; 0: twice --rate-limit)"},
			{"2000001", "--rate-burst must be at most 2000000"},
		}},
		{"reload-interval", []string{"10ms", "5s", "1h"}, []bad{
			{"0s", "--reload-interval must be at least 10ms, not 0s (allowed: 10ms to 1h0m0s)"},
			{"-1s", "--reload-interval must be at least 10ms, not -1s"},
			{"2h", "--reload-interval must be at most 1h0m0s, not 2h0m0s"},
		}},
		{"reject-cooldown", []string{"0s", "5s", "1h"}, []bad{
			{"-1ns", "--reject-cooldown must not be negative, not -1ns (allowed: 0s to 1h0m0s; 0: no limit)"},
			{"61m", "--reject-cooldown must be at most 1h0m0s"},
		}},
		{"max-concurrent-upstream", []string{"1", "32", "100000"}, []bad{
			{"0", "--max-concurrent-upstream must be at least 1, not 0 (allowed: 1 to 100000)"},
			{"-3", "--max-concurrent-upstream must be at least 1, not -3"},
			{"100001", "--max-concurrent-upstream must be at most 100000, not 100001"},
		}},
		{"max-concurrent-upstream-per-host", []string{"1", "8", "100000"}, []bad{
			{"0", "--max-concurrent-upstream-per-host must be at least 1, not 0 (allowed: 1 to 100000)"},
			{"100001", "--max-concurrent-upstream-per-host must be at most 100000"},
		}},
		{"gc-heap-floor-mib", []string{"0", "64", "1048576"}, []bad{
			{"-1", "--gc-heap-floor-mib must not be negative, not -1 (allowed: 0 to 1048576; 0: off)"},
			{"1048577", "--gc-heap-floor-mib must be at most 1048576"},
		}},
		{"shutdown-timeout", []string{"0s", "30s", "1h"}, []bad{
			{"-5s", "--shutdown-timeout must not be negative, not -5s (allowed: 0s to 1h0m0s; 0: stop at once)"},
			{"90m", "--shutdown-timeout must be at most 1h0m0s, not 1h30m0s"},
		}},
	} {
		t.Run(tc.flag, func(t *testing.T) {
			env := "TOKENBROKER_" + strings.ToUpper(strings.ReplaceAll(tc.flag, "-", "_"))
			for _, v := range tc.ok {
				if _, err := parseConfig([]string{"--" + tc.flag, v}, noEnv, io.Discard); err != nil {
					t.Errorf("--%s %s refused: %v", tc.flag, v, err)
				}
			}
			for _, b := range tc.bad {
				for how, parse := range map[string]func() (*config, error){
					"flag": func() (*config, error) { return parseConfig([]string{"--" + tc.flag, b.value}, noEnv, io.Discard) },
					"env":  func() (*config, error) { return parseConfig(nil, envOf(env, b.value), io.Discard) },
				} {
					_, err := parse()
					if err == nil {
						t.Errorf("%s %s accepted", how, b.value)
						continue
					}
					if msg := err.Error(); !strings.Contains(msg, b.want) || strings.Contains(msg, "\n") {
						t.Errorf("%s %s: %q, want one line containing %q", how, b.value, msg, b.want)
					}
				}
			}
		})
	}
	// The table covers every numeric flag: a new one without a range
	// fails here.
	tested := map[string]bool{}
	for _, name := range []string{"rate-limit", "rate-burst", "reload-interval", "reject-cooldown",
		"max-concurrent-upstream", "max-concurrent-upstream-per-host", "gc-heap-floor-mib", "shutdown-timeout"} {
		tested[name] = true
	}
	(&config{}).flagSet(io.Discard).VisitAll(func(f *flag.Flag) {
		switch f.Value.(flag.Getter).Get().(type) {
		case int, int64, uint, uint64, float64, time.Duration:
			if !tested[f.Name] {
				t.Errorf("numeric flag --%s has no range test", f.Name)
			}
		}
	})
}

func noEnv(string) string { return "" }

func envOf(name, value string) func(string) string {
	return func(k string) string {
		if k == name {
			return value
		}
		return ""
	}
}
