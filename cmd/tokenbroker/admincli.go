package main

import (
	"context"
	"crypto/tls"
	"crypto/x509"
	"errors"
	"flag"
	"fmt"
	"io"
	"os"
	"strings"
	"time"

	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials"
	"google.golang.org/grpc/credentials/insecure"
	"google.golang.org/grpc/status"

	adminv1 "tokenbroker/gen/tokenbroker/admin/v1"

	"tokenbroker/storage"
)

// lifecycleCommand is one of the data lifecycle subcommands.
type lifecycleCommand func(ctx context.Context, args []string, getenv func(string) string, stdout, stderr io.Writer) error

// lifecycleCommands are the subcommands beside serve and version, by the
// word that selects them. "keys" takes a second word.
var lifecycleCommands = map[string]lifecycleCommand{
	"backup":  backupCmd,
	"restore": restoreCmd,
	"rekey":   rekeyCmd,
	"keys":    keysCmd,
}

// errUsage means the command line was wrong; the flag package has already
// said why and printed the usage.
var errUsage = errors.New("usage")

// runLifecycle runs a lifecycle subcommand and returns the exit code: 0 on
// success and for --help, 2 for a wrong command line, 1 for any other
// failure, said in one line on stderr.
func runLifecycle(ctx context.Context, name string, cmd lifecycleCommand, args []string, getenv func(string) string, stdout, stderr io.Writer) int {
	err := cmd(ctx, args, getenv, stdout, stderr)
	switch {
	case err == nil, errors.Is(err, flag.ErrHelp):
		return 0
	case errors.Is(err, errUsage):
		return 2
	}
	fmt.Fprintf(stderr, "tokenbroker %s: %s\n", name, oneLine(err))
	return 1
}

// oneLine is err's message without line breaks, gRPC statuses as their
// code and message.
func oneLine(err error) string {
	msg := err.Error()
	if s, ok := status.FromError(err); ok {
		msg = "server answered " + s.Code().String() + ": " + s.Message()
	}
	return strings.Join(strings.Fields(msg), " ")
}

// newFlagSet returns a flag set whose usage starts with synopsis.
func newFlagSet(name, synopsis string, stderr io.Writer) *flag.FlagSet {
	fs := flag.NewFlagSet("tokenbroker "+name, flag.ContinueOnError)
	fs.SetOutput(stderr)
	fs.Usage = func() {
		fmt.Fprintf(stderr, "usage: tokenbroker %s\n\n", synopsis)
		fs.PrintDefaults()
	}
	return fs
}

// parseFlags parses args, refusing positional arguments.
func parseFlags(fs *flag.FlagSet, args []string) error {
	if err := fs.Parse(args); err != nil {
		if errors.Is(err, flag.ErrHelp) {
			return err
		}
		return errUsage
	}
	if fs.NArg() > 0 {
		fmt.Fprintf(fs.Output(), "unexpected argument %q\n", fs.Arg(0))
		fs.Usage()
		return errUsage
	}
	return nil
}

// serverFlags are the flags that reach a running broker, named as
// grpcurl's.
type serverFlags struct {
	server  string
	cert    string
	key     string
	cacert  string
	timeout time.Duration
}

func (f *serverFlags) register(fs *flag.FlagSet) {
	fs.StringVar(&f.server, "server", "127.0.0.1:50051", "address of the running broker")
	fs.StringVar(&f.cacert, "cacert", "", "CA bundle (PEM) the server's certificate must chain to; enables TLS (plaintext without it, on loopback only)")
	fs.StringVar(&f.cert, "cert", "", "client certificate (PEM) of an operator of every tenant")
	fs.StringVar(&f.key, "key", "", "client private key (PEM) for --cert")
	fs.DurationVar(&f.timeout, "timeout", time.Hour, "how long the whole command may take")
}

// dial connects to the broker: TLS with --cacert (and the client
// certificate of --cert/--key), plaintext only to a loopback address.
func (f *serverFlags) dial() (adminv1.AdminBrokerClient, func(), error) {
	if (f.cert == "") != (f.key == "") {
		return nil, nil, errors.New("--cert and --key go together")
	}
	creds := insecure.NewCredentials()
	switch {
	case f.cacert != "":
		tc, err := f.tlsConfig()
		if err != nil {
			return nil, nil, err
		}
		creds = credentials.NewTLS(tc)
	case f.cert != "":
		return nil, nil, errors.New("--cert needs --cacert: the server's certificate must be checked")
	case !loopback(f.server):
		return nil, nil, fmt.Errorf("refusing plaintext to %s: give --cacert (and --cert/--key), or a loopback address", f.server)
	}
	cc, err := grpc.NewClient(f.server, grpc.WithTransportCredentials(creds),
		grpc.WithDefaultCallOptions(grpc.MaxCallRecvMsgSize(16<<20)))
	if err != nil {
		return nil, nil, fmt.Errorf("server %s: %w", f.server, err)
	}
	return adminv1.NewAdminBrokerClient(cc), func() { cc.Close() }, nil
}

func (f *serverFlags) tlsConfig() (*tls.Config, error) {
	pem, err := os.ReadFile(f.cacert)
	if err != nil {
		return nil, fmt.Errorf("--cacert: %w", err)
	}
	tc := &tls.Config{MinVersion: tls.VersionTLS12, RootCAs: x509.NewCertPool()}
	if !tc.RootCAs.AppendCertsFromPEM(pem) {
		return nil, fmt.Errorf("--cacert %s holds no PEM certificate", f.cacert)
	}
	if f.cert != "" {
		cert, err := tls.LoadX509KeyPair(f.cert, f.key)
		if err != nil {
			// The key file's content is never echoed.
			return nil, fmt.Errorf("--cert/--key: cannot load the key pair from %s and %s", f.cert, f.key)
		}
		tc.Certificates = []tls.Certificate{cert}
	}
	return tc, nil
}

// keyFlag is the data key, as serve takes it: --key-file or TOKENBROKER_KEY.
type keyFlag struct{ file string }

func (k *keyFlag) register(fs *flag.FlagSet, what string) {
	fs.StringVar(&k.file, "key-file", "", "data key file (the broker's --key-file) "+what+"; TOKENBROKER_KEY may hold the keys instead")
}

// load reads the keys; given says whether any were given.
func (k *keyFlag) load(getenv func(string) string) (keys *storage.Keyring, given bool, err error) {
	if v := getenv("TOKENBROKER_KEY"); v != "" && k.file == "" {
		keys, err := storage.ParseKeys([]byte(v))
		if err != nil {
			return nil, true, fmt.Errorf("TOKENBROKER_KEY: %w", err)
		}
		return keys, true, nil
	}
	if k.file == "" {
		return nil, false, nil
	}
	keys, err = storage.LoadKeyFile(k.file)
	return keys, true, err
}

// progress writes a progress line that rewrites itself, on a terminal
// only, at most a few times a second.
type progress struct {
	w     io.Writer
	on    bool
	last  time.Time
	shown bool
}

func newProgress(w io.Writer) *progress {
	f, ok := w.(*os.File)
	if !ok {
		return &progress{w: w}
	}
	info, err := f.Stat()
	return &progress{w: w, on: err == nil && info.Mode()&os.ModeCharDevice != 0}
}

// show rewrites the line unless it was written less than 200 ms ago.
func (p *progress) show(format string, args ...any) {
	if !p.on || time.Since(p.last) < 200*time.Millisecond {
		return
	}
	p.last = time.Now()
	p.shown = true
	fmt.Fprintf(p.w, "\r\033[K"+format, args...)
}

// done ends the line, if one was shown.
func (p *progress) done() {
	if p.shown {
		fmt.Fprint(p.w, "\r\033[K")
	}
}
