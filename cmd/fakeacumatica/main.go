// Command fakeacumatica runs the stand-in Acumatica identity server of
// package acumaticatest on loopback, for trying tokenbroker locally and for
// tests that run real binaries.
//
//	fakeacumatica [--listen 127.0.0.1:8081] [--client-id ID --client-secret S --username U --password P]
//	              [--authcode-client-id ID --authcode-client-secret S --redirect-uri URI --consent-user U]
//
// The first client uses Resource Owner Password Credentials; the second is
// set to the Authorization Code flow with one registered redirect URI, and
// the authorize endpoint consents on its own for the consent user (the
// integration user by default), so `curl` can follow an authorization URL
// to the redirect.
//
// Its switches (faults, revocation, password change, counters) are under
// /_control/ on the same port; see acumaticatest.ControlHandler.
package main

import (
	"flag"
	"fmt"
	"net"
	"net/http"
	"os"
	"strings"
	"time"

	"tokenbroker/broker/acumaticatest"
)

func main() {
	listen := flag.String("listen", "127.0.0.1:8081", "listen address (loopback)")
	clientID := flag.String("client-id", "88358B02-A48D-A50E-F710-39C1636C30F6@MyTenant", "Connected Application client ID")
	clientSecret := flag.String("client-secret", "demo-shared-secret", "Connected Application shared secret")
	user := flag.String("username", "integration", "integration user's login")
	password := flag.String("password", "demo-password", "integration user's password")
	lifetime := flag.Duration("access-token-lifetime", time.Hour, "expires_in of access tokens")
	sliding := flag.Duration("sliding-lifetime", 15*24*time.Hour, "refresh token sliding lifetime")
	maxSessions := flag.Int("max-sessions", 0, "concurrent sign-ins per user (0: unlimited)")
	entities := flag.String("entities", "SalesOrder,Shipment,StockItem", "entities the user's role may read")
	acClientID := flag.String("authcode-client-id", "5B3F0E3A-8D4C-4E1B-9A0F-2C6D7E8F9A1B@MyTenant", "Connected Application (Authorization Code flow) client ID")
	acClientSecret := flag.String("authcode-client-secret", "demo-authcode-secret", "its shared secret")
	redirectURI := flag.String("redirect-uri", "http://127.0.0.1:8765/callback", "its registered redirect URI (matched exactly)")
	consentUser := flag.String("consent-user", "", "user who consents at the authorize endpoint (default --username)")
	codeLifetime := flag.Duration("code-lifetime", time.Minute, "how long an authorization code stays valid")
	flag.Parse()
	if *consentUser == "" {
		*consentUser = *user
	}

	srv := acumaticatest.New(acumaticatest.Options{
		AccessTokenLifetime: *lifetime,
		SlidingLifetime:     *sliding,
		MaxSessions:         *maxSessions,
		Entities:            strings.Split(*entities, ","),
		CodeLifetime:        *codeLifetime,
	})
	srv.AddAuthCodeClient(*acClientID, *acClientSecret, *redirectURI)
	srv.SetConsentUser(*consentUser)
	srv.AddClient(*clientID, *clientSecret)
	srv.AddUser(*user, *password)
	lis, err := net.Listen("tcp", *listen)
	if err != nil {
		fmt.Fprintln(os.Stderr, "fakeacumatica:", err)
		os.Exit(1)
	}
	fmt.Fprintf(os.Stderr, "fakeacumatica: serving http://%s (token endpoint /identity/connect/token, authorize /identity/connect/authorize, control /_control/)\n", lis.Addr())
	hs := &http.Server{Handler: srv.FullHandler(), ReadHeaderTimeout: 10 * time.Second}
	if err := hs.Serve(lis); err != nil {
		fmt.Fprintln(os.Stderr, "fakeacumatica:", err)
		os.Exit(1)
	}
}
