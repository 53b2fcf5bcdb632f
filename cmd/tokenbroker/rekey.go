package main

import (
	"context"
	"errors"
	"flag"
	"fmt"
	"io"
	"strings"

	adminv1 "tokenbroker/gen/tokenbroker/admin/v1"
)

// errOldKeysInUse is keys status's "no": records still need an older key.
var errOldKeysInUse = errors.New("old keys still in use")

// rekeyCmd has the running broker reseal every record with its sealing
// key (the first key of its key file).
func rekeyCmd(ctx context.Context, args []string, _ func(string) string, stdout, stderr io.Writer) error {
	fs := newFlagSet("rekey", "rekey --server ADDR [--batch-size N] [--cacert F --cert F --key F]", stderr)
	var sf serverFlags
	sf.register(fs)
	batch := fs.Int("batch-size", 500, "records resealed per write (each write is one transaction shared with serving)")
	if err := parseFlags(fs, args); err != nil {
		return err
	}
	if err := inRange("--batch-size", *batch, 1, 10_000, ""); err != nil {
		return err
	}
	ctx, cancel := context.WithTimeout(ctx, sf.timeout)
	defer cancel()
	client, closeConn, err := sf.dial()
	if err != nil {
		return err
	}
	defer closeConn()
	stream, err := client.Rekey(ctx, &adminv1.RekeyRequest{BatchSize: int32(*batch)})
	if err != nil {
		return err
	}
	p := newProgress(stderr)
	var last *adminv1.RekeyResponse
	for last == nil || !last.GetDone() {
		if last, err = stream.Recv(); err != nil {
			p.done()
			if errors.Is(err, io.EOF) {
				return errors.New("the server ended the rekey before it was done; run rekey again (it goes on where records still need an older key)")
			}
			return err
		}
		p.show("rekey: %d records resealed, %d examined", last.GetResealed(), last.GetExamined())
	}
	p.done()
	fmt.Fprintf(stdout, "rekey: %d of %d records resealed with key id %s; %d still need an older key\n",
		last.GetResealed(), last.GetExamined(), last.GetSealingKeyId(), last.GetRemaining())
	if last.GetRemaining() > 0 {
		return fmt.Errorf("%d records were written with an older key meanwhile; run rekey again", last.GetRemaining())
	}
	return nil
}

// keysCmd dispatches "keys status", the one keys subcommand.
func keysCmd(ctx context.Context, args []string, getenv func(string) string, stdout, stderr io.Writer) error {
	if len(args) > 0 && args[0] == "status" {
		return keyStatusCmd(ctx, args[1:], getenv, stdout, stderr)
	}
	fmt.Fprintln(stderr, "usage: tokenbroker keys status --server ADDR [--cacert F --cert F --key F]")
	if len(args) > 0 && (args[0] == "--help" || args[0] == "-help" || args[0] == "-h") {
		return flag.ErrHelp
	}
	return errUsage
}

// keyStatusCmd answers "can I remove the old key now?": exit 0 and "yes"
// when every record and every replica uses the sealing key only, exit 1
// and "no" with the count otherwise.
func keyStatusCmd(ctx context.Context, args []string, _ func(string) string, stdout, stderr io.Writer) error {
	fs := newFlagSet("keys status", "keys status --server ADDR [--cacert F --cert F --key F]\n\nExit status 0: the keys other than the sealing key seal nothing and may leave the key file; 1: not yet (or the question could not be answered)", stderr)
	var sf serverFlags
	sf.register(fs)
	if err := parseFlags(fs, args); err != nil {
		return err
	}
	ctx, cancel := context.WithTimeout(ctx, sf.timeout)
	defer cancel()
	client, closeConn, err := sf.dial()
	if err != nil {
		return err
	}
	defer closeConn()
	st, err := client.GetKeyStatus(ctx, &adminv1.GetKeyStatusRequest{})
	if err != nil {
		return err
	}
	answer, err := keyAnswer(st)
	fmt.Fprintln(stdout, answer)
	for _, u := range st.GetKeyUses() {
		role := "older key"
		if u.GetKeyId() == st.GetSealingKeyId() {
			role = "sealing key"
		}
		fmt.Fprintf(stdout, "  key id %s (%s): %d records\n", u.GetKeyId(), role, u.GetRecords())
	}
	for _, r := range st.GetReplicas() {
		fmt.Fprintf(stdout, "  replica %s holds key ids %s\n", r.GetId(), strings.Join(r.GetKeyIds(), ", "))
	}
	return err
}

// keyAnswer is the one-line answer, and errOldKeysInUse when it is no.
func keyAnswer(st *adminv1.GetKeyStatusResponse) (string, error) {
	for _, r := range st.GetReplicas() {
		if len(r.GetKeyIds()) == 0 || r.GetKeyIds()[0] != st.GetSealingKeyId() {
			return fmt.Sprintf("no: replica %s seals with key id %s, not %s; restart it with the new key first in its key file, then run tokenbroker rekey",
				r.GetId(), strings.Join(r.GetKeyIds(), ","), st.GetSealingKeyId()), errOldKeysInUse
		}
	}
	if n := st.GetRecordsNeedingOlderKeys(); n > 0 {
		return fmt.Sprintf("no: %d of %d records still need a key other than the sealing key %s; run tokenbroker rekey", n, st.GetRecords(), st.GetSealingKeyId()), errOldKeysInUse
	}
	return fmt.Sprintf("yes: all %d records are sealed with key id %s; the other keys may leave the key file (restart each broker after editing it)", st.GetRecords(), st.GetSealingKeyId()), nil
}
