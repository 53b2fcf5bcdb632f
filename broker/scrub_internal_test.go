package broker

import (
	"strings"
	"testing"
)

func TestScrubSeesThroughSplitsAndStrayPercents(t *testing.T) {
	const secret = "s3cr3t-value&x"
	for _, tc := range []struct{ name, in string }{
		{"control character inside", "bad s3cr\x003t-value&x"},
		{"escape inside", "bad s3cr\x1b3t-value&x"},
		{"form-encoded after a stray percent", "100% bad s3cr3t-value%26x"},
		{"every byte escaped", "bad %73%33%63%72%33%74%2D%76%61%6C%75%65%26%78"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			got := scrub(tc.in, 200, []string{secret})
			if strings.Contains(got, "s3cr3t") || strings.Contains(got, "%73%33") {
				t.Errorf("scrub(%q) = %q", tc.in, got)
			}
		})
	}
}

// A secret that is part of the redaction mark must not make scrub loop.
func TestScrubEndsWhenTheSecretIsInTheMark(t *testing.T) {
	for _, secret := range []string{"redacted", "dact", "[red", "ted]"} {
		got := scrub("echo "+secret+" and "+secret, 200, []string{secret})
		if strings.Contains(strings.ReplaceAll(got, redactedMark, ""), secret) {
			t.Errorf("scrub with secret %q = %q", secret, got)
		}
	}
}
