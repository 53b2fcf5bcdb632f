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

// FuzzScrub: whatever the upstream text, scrub ends, and what it returns is
// printable, short, and holds no secret in any form it removes.
func FuzzScrub(f *testing.F) {
	for _, s := range [][2]string{
		{"bad P%40ss+w0rd%21%26x%3D1", "P@ss w0rd!&x=1"},
		{"echo redacted", "redacted"},
		{"x UEBzcyB3MHJk y", "P@ss w0rd"},
		{"s3cr\x003t-value", "s3cr3t-value"},
		{"100% %73%33%63%72%33%74", "s3cr3t"},
	} {
		f.Add(s[0], s[1])
	}
	f.Fuzz(func(t *testing.T, text, secret string) {
		got := scrub(text, 200, []string{secret})
		if len(got) > 203 || printable(got) != got {
			t.Fatalf("scrub(%q) = %q: not printable or too long", text, got)
		}
		fixed := strings.ToLower(redactedMark + withheld + withheldShort + "...")
		for _, form := range secretForms([]string{secret}) {
			lf := strings.ToLower(form)
			if strings.Contains(strings.ToLower(got), lf) && !strings.Contains(fixed, lf) {
				t.Errorf("scrub(%q) = %q holds %q", text, got, form)
			}
		}
	})
}
