package server

import (
	"crypto/tls"
	"crypto/x509"
	"errors"
	"fmt"
	"os"
	"sync/atomic"

	"google.golang.org/grpc/credentials"
)

// TLSFiles serves TLS from certificate, key and client CA files that can be
// replaced on disk: [TLSFiles.Reload] reads them again, and handshakes from
// then on use the new material. Client certificates, when a CA is given,
// are verified if presented (TLS 1.2+); a caller without one reaches only
// health checks, everything else answers UNAUTHENTICATED.
type TLSFiles struct {
	certFile, keyFile, caFile string
	cur                       atomic.Pointer[tls.Config] // replaced whole on reload
}

// NewTLSFiles loads the files once; caFile may be empty (no client auth).
func NewTLSFiles(certFile, keyFile, caFile string) (*TLSFiles, error) {
	t := &TLSFiles{certFile: certFile, keyFile: keyFile, caFile: caFile}
	if err := t.Reload(); err != nil {
		return nil, err
	}
	return t, nil
}

// Reload reads the files again; on error the previous material stays.
func (t *TLSFiles) Reload() error {
	cert, err := tls.LoadX509KeyPair(t.certFile, t.keyFile)
	if err != nil {
		return fmt.Errorf("server: tls key pair: %w", err)
	}
	cfg := &tls.Config{Certificates: []tls.Certificate{cert}, MinVersion: tls.VersionTLS12}
	if t.caFile != "" {
		pem, err := os.ReadFile(t.caFile)
		if err != nil {
			return fmt.Errorf("server: client ca: %w", err)
		}
		pool := x509.NewCertPool()
		if !pool.AppendCertsFromPEM(pem) {
			return errors.New("server: client ca: no PEM certificates in " + t.caFile)
		}
		cfg.ClientCAs = pool
		cfg.ClientAuth = tls.VerifyClientCertIfGiven
	}
	t.cur.Store(cfg)
	return nil
}

// Credentials are the gRPC server credentials to serve with: TLS with
// [TLSFiles.Config], each connection's caller identity found once, at its
// handshake.
func (t *TLSFiles) Credentials() credentials.TransportCredentials {
	return identityCreds{credentials.NewTLS(t.Config())}
}

// Config is the tls.Config to serve with; it picks up reloads.
func (t *TLSFiles) Config() *tls.Config {
	return &tls.Config{
		MinVersion: tls.VersionTLS12,
		GetConfigForClient: func(*tls.ClientHelloInfo) (*tls.Config, error) {
			return t.cur.Load(), nil
		},
	}
}
