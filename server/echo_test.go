package server_test

import (
	"bytes"
	"context"
	"encoding/base64"
	"encoding/json"
	"fmt"
	"net/http"
	"net/http/httptest"
	"net/url"
	"os"
	"strings"
	"sync"
	"testing"

	"google.golang.org/protobuf/encoding/prototext"
	"google.golang.org/protobuf/types/known/fieldmaskpb"

	pb "tokenbroker/gen/tokenbroker/v1"
)

// Secrets chosen so that every encoding differs from the raw form.
const (
	echoSecret   = `Cl!ent&Secret=9 "q"<x>`
	echoPassword = `P@ss w0rd!&x=1\"<y>`
	echoNewPass  = `N3w P@ss/w0rd?&z=2`
	echoRefresh  = `RT+echo/7f3a 9c2e=51`
)

// echoingIdP is a hostile identity server: it answers the first password
// grant, and every later token request with invalid_grant whose
// description echoes each secret of that request, in one encoding.
type echoingIdP struct {
	encode func(string) string

	mu     sync.Mutex // guards issued
	issued bool
}

func (e *echoingIdP) ServeHTTP(w http.ResponseWriter, r *http.Request) {
	if r.URL.Path != "/identity/connect/token" || r.ParseForm() != nil {
		http.NotFound(w, r)
		return
	}
	e.mu.Lock()
	defer e.mu.Unlock()
	w.Header().Set("Content-Type", "application/json")
	if !e.issued && r.PostForm.Get("grant_type") == "password" {
		e.issued = true
		json.NewEncoder(w).Encode(map[string]any{
			"access_token": "AT-echo-first", "token_type": "Bearer", "expires_in": 3600, "refresh_token": echoRefresh,
		})
		return
	}
	var desc []string
	for _, k := range []string{"client_secret", "password", "refresh_token"} {
		if v := r.PostForm.Get(k); v != "" {
			desc = append(desc, k+"="+e.encode(v))
		}
	}
	w.WriteHeader(http.StatusBadRequest)
	json.NewEncoder(w).Encode(map[string]string{"error": "invalid_grant", "error_description": "rejected " + strings.Join(desc, " ")})
}

// echoEncodings are the forms an upstream may echo a secret in.
var echoEncodings = map[string]func(string) string{
	"raw":            func(s string) string { return s },
	"form":           url.QueryEscape,
	"form lower hex": func(s string) string { return lowerHex(url.QueryEscape(s)) },
	"path":           url.PathEscape,
	"json":           jsonInner,
	"base64 std":     b64(base64.StdEncoding),
	"base64 url":     b64(base64.URLEncoding),
	"base64 raw std": b64(base64.RawStdEncoding),
	"base64 raw url": b64(base64.RawURLEncoding),
	"basic auth":     func(s string) string { return "Basic " + base64.StdEncoding.EncodeToString([]byte(clientID+":"+s)) },
	"basic auth +1":  func(s string) string { return base64.StdEncoding.EncodeToString([]byte("x" + s + "y")) },
	"basic auth +2":  func(s string) string { return base64.URLEncoding.EncodeToString([]byte("xy" + s + "z")) },
	"mixed":          func(s string) string { return mixedEscape(s) },
}

func b64(enc *base64.Encoding) func(string) string {
	return func(s string) string { return enc.EncodeToString([]byte(s)) }
}

func jsonInner(s string) string {
	b, _ := json.Marshal(s)
	return string(b[1 : len(b)-1])
}

func lowerHex(s string) string {
	var b strings.Builder
	for i := 0; i < len(s); i++ {
		if s[i] == '%' && i+2 < len(s) {
			b.WriteString(strings.ToLower(s[i : i+3]))
			i += 2
			continue
		}
		b.WriteByte(s[i])
	}
	return b.String()
}

// mixedEscape percent-encodes every other byte: a form no encoder makes.
func mixedEscape(s string) string {
	var b strings.Builder
	for i := 0; i < len(s); i++ {
		if i%2 == 0 {
			fmt.Fprintf(&b, "%%%02X", s[i])
		} else {
			b.WriteByte(s[i])
		}
	}
	return b.String()
}

// leakForms are the strings whose presence anywhere is a leak: every
// encoding of every secret.
func leakForms() []string {
	var out []string
	for _, s := range []string{echoSecret, echoPassword, echoNewPass, echoRefresh} {
		for _, enc := range echoEncodings {
			out = append(out, enc(s))
		}
	}
	return out
}

func TestEchoedSecretsNeverLeakInAnyEncoding(t *testing.T) {
	for name, enc := range echoEncodings {
		t.Run(name, func(t *testing.T) {
			f := newFixture(t)
			ctx := context.Background()
			idp := httptest.NewServer(&echoingIdP{encode: enc})
			t.Cleanup(idp.Close)
			c := f.connection()
			c.InstanceUrl, c.ClientSecret, c.Password = idp.URL, echoSecret, echoPassword
			resp, err := f.client.CreateConnection(ctx, &pb.CreateConnectionRequest{Parent: "tenants/acme", ConnectionId: "erp", Connection: c})
			if err != nil {
				t.Fatalf("CreateConnection: %v", err)
			}
			created := resp.GetConnection()
			// A rejected token makes the broker refresh; the echoed
			// invalid_grant drops the refresh token, the password grant
			// that follows is echoed too, and the connection halts.
			_, tokErr := f.client.GetAccessToken(ctx, &pb.GetAccessTokenRequest{Name: created.GetName(), RejectedAccessToken: "AT-echo-first"})
			if tokErr == nil {
				t.Fatal("GetAccessToken succeeded against an identity server that rejects everything")
			}
			got, err := f.client.GetConnection(ctx, &pb.GetConnectionRequest{Name: created.GetName()})
			if err != nil {
				t.Fatal(err)
			}
			lastErr := prototext.Format(got.GetConnection().GetStatus().GetLastError())
			if !strings.Contains(lastErr, "invalid_grant") {
				t.Fatalf("last_error %q does not carry the upstream's answer: the echo did not reach it", lastErr)
			}
			_, updErr := f.client.UpdateConnection(ctx, &pb.UpdateConnectionRequest{
				Connection: &pb.Connection{Name: created.GetName(), Password: echoNewPass},
				UpdateMask: &fieldmaskpb.FieldMask{Paths: []string{"password"}},
			})
			if updErr == nil || !strings.Contains(updErr.Error(), "invalid_grant") {
				t.Fatalf("UpdateConnection = %v, want the echoed invalid_grant", updErr)
			}
			file, err := os.ReadFile(f.store.Path())
			if err != nil {
				t.Fatal(err)
			}
			f.mu.Lock()
			places := map[string][]byte{
				"GetAccessToken error":   []byte(tokErr.Error()),
				"UpdateConnection error": []byte(updErr.Error()),
				"status.last_error":      []byte(lastErr),
				"every answer":           []byte(strings.Join(f.seen, "\n")),
				"log":                    []byte(f.logs.String()),
				"data file":              file,
			}
			f.mu.Unlock()
			for where, text := range places {
				for _, form := range leakForms() {
					if bytes.Contains(text, []byte(form)) {
						t.Errorf("%s holds the secret form %q", where, form)
					}
				}
			}
		})
	}
}
