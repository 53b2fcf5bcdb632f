package broker

import (
	"bytes"
	"encoding/base64"
	"encoding/json"
	"net/url"
	"slices"
	"strings"
)

// minSecretLen is the shortest secret scrub looks for: shorter ones would
// blank ordinary words.
const minSecretLen = 4

// redactedMark replaces a secret in upstream text.
const redactedMark = "[redacted]"

// withheld replaces upstream text that still reveals a secret once decoded,
// after every known form of it was removed.
const withheld = "[upstream text withheld: it echoed a credential]"

// withheldShort replaces any upstream text when a secret of the request is
// shorter than minSecretLen: an echo of it could not be told from ordinary
// words, so none of the text is shown.
const withheldShort = "[upstream text withheld: a credential of the request is too short to find in it]"

// scrub makes upstream text fit for a log, a status or the data file:
// printable ASCII only, every secret of the request removed in each form an
// upstream may echo it in (raw, form- and path-encoded, JSON-escaped,
// base64), cut to n bytes. Text that still reveals a secret when
// percent- or JSON-decoded (an encoding mixed by hand) is withheld whole,
// and so is any text when a secret is too short to look for.
func scrub(s string, n int, secrets []string) string {
	s = printable(s)
	if s != "" && hasShortSecret(secrets) {
		return withheldShort
	}
	forms := secretForms(secrets)
	s = redact(s, forms)
	if revealsForm(s, forms) {
		return withheld
	}
	return cut(s, n)
}

// hasShortSecret reports whether a secret is set but shorter than
// minSecretLen.
func hasShortSecret(secrets []string) bool {
	return slices.ContainsFunc(secrets, func(sec string) bool { return sec != "" && len(sec) < minSecretLen })
}

// printable keeps the printable ASCII characters of s. It runs before any
// secret is looked for, so that a control character slipped into an echo
// cannot split a secret from its match and then vanish.
func printable(s string) string {
	var b strings.Builder
	for _, r := range s {
		if r >= 0x20 && r < 0x7f {
			b.WriteRune(r)
		}
	}
	return b.String()
}

// cut shortens s to n bytes, marking the cut.
func cut(s string, n int) string {
	if len(s) <= n {
		return s
	}
	return s[:n] + "..."
}

// secretForms lists every form of the secrets scrub removes, longest first
// so that a longer form is removed before a shorter one inside it. Forms
// are made printable as the text is.
func secretForms(secrets []string) []string {
	var forms []string
	for _, sec := range secrets {
		if len(sec) < minSecretLen {
			continue
		}
		for _, f := range encodings(sec) {
			if f = printable(f); len(f) >= minSecretLen && !slices.Contains(forms, f) {
				forms = append(forms, f)
			}
		}
	}
	slices.SortStableFunc(forms, func(a, b string) int { return len(b) - len(a) })
	return forms
}

// encodings are the forms sec may take in an upstream answer that echoes a
// request: the form body's encoding, a URL path's, JSON string escaping
// (with and without HTML escaping), and base64 in both alphabets, padded
// and raw, with the part of the text that stays the same wherever sec
// starts inside a longer encoded value (an echoed Basic authorization
// header, say).
func encodings(sec string) []string {
	out := []string{sec, url.QueryEscape(sec), url.PathEscape(sec), jsonEscape(sec, true), jsonEscape(sec, false)}
	for _, enc := range []*base64.Encoding{base64.StdEncoding, base64.URLEncoding, base64.RawStdEncoding, base64.RawURLEncoding} {
		out = append(out, enc.EncodeToString([]byte(sec)))
	}
	for _, enc := range []*base64.Encoding{base64.RawStdEncoding, base64.RawURLEncoding} {
		for offset := range 3 {
			out = append(out, base64Core(enc, sec, offset))
		}
	}
	return out
}

// jsonEscape is sec as it appears inside a JSON string.
func jsonEscape(sec string, escapeHTML bool) string {
	var b bytes.Buffer
	e := json.NewEncoder(&b)
	e.SetEscapeHTML(escapeHTML)
	_ = e.Encode(sec) // a string always encodes
	return strings.TrimSuffix(strings.TrimSuffix(strings.TrimPrefix(b.String(), `"`), "\n"), `"`)
}

// base64Core is the part of the base64 encoding of sec, placed offset bytes
// into a longer value, that depends on sec alone: the characters whose six
// bits all fall inside sec.
func base64Core(enc *base64.Encoding, sec string, offset int) string {
	full := enc.EncodeToString(append(make([]byte, offset), sec...))
	first := (8*offset + 5) / 6
	last := 8 * (offset + len(sec)) / 6
	if first >= last {
		return ""
	}
	return full[first:last]
}

// redact replaces every form in s, ignoring ASCII case: percent-encoding
// may come back in lower-case hex, and over-redacting costs nothing.
func redact(s string, forms []string) string {
	for _, f := range forms {
		s = redactOne(s, f)
	}
	return s
}

// redactOne replaces each occurrence of f in s in one pass from the left,
// so that a secret that is part of the mark itself cannot loop forever.
func redactOne(s, f string) string {
	lower, lf := strings.ToLower(s), strings.ToLower(f)
	var b strings.Builder
	for {
		i := strings.Index(lower, lf)
		if i < 0 {
			b.WriteString(s)
			return b.String()
		}
		b.WriteString(s[:i])
		b.WriteString(redactedMark)
		s, lower = s[i+len(f):], lower[i+len(f):]
	}
}

// revealsForm reports whether s, once percent-, form- or JSON-decoded,
// holds one of forms.
func revealsForm(s string, forms []string) bool {
	if len(forms) == 0 {
		return false
	}
	decoded := []string{percentDecode(s, true), percentDecode(s, false)}
	var js string
	if json.Unmarshal([]byte(`"`+s+`"`), &js) == nil {
		decoded = append(decoded, js)
	}
	for _, d := range decoded {
		d = strings.ToLower(printable(d))
		for _, f := range forms {
			if strings.Contains(d, strings.ToLower(f)) {
				return true
			}
		}
	}
	return false
}

// percentDecode decodes every valid %XX of s, and + as a space when
// plusSpace, leaving anything else as it is: a stray % must not hide the
// rest of the text from the check.
func percentDecode(s string, plusSpace bool) string {
	var b strings.Builder
	for i := 0; i < len(s); i++ {
		switch {
		case s[i] == '%' && i+2 < len(s) && isHex(s[i+1]) && isHex(s[i+2]):
			b.WriteByte(unhex(s[i+1])<<4 | unhex(s[i+2]))
			i += 2
		case s[i] == '+' && plusSpace:
			b.WriteByte(' ')
		default:
			b.WriteByte(s[i])
		}
	}
	return b.String()
}

func isHex(c byte) bool {
	return '0' <= c && c <= '9' || 'a' <= c && c <= 'f' || 'A' <= c && c <= 'F'
}

func unhex(c byte) byte {
	switch {
	case c <= '9':
		return c - '0'
	case c <= 'F':
		return c - 'A' + 10
	}
	return c - 'a' + 10
}
