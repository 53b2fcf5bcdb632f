package main

import (
	"context"
	"errors"
	"fmt"
	"io"

	adminv1 "tokenbroker/gen/tokenbroker/admin/v1"

	"tokenbroker/storage"
	"tokenbroker/storage/bolt"
)

// backupCmd takes an online backup through the admin service and writes
// it as a bbolt data file: records stay sealed and the key is not in it.
func backupCmd(ctx context.Context, args []string, getenv func(string) string, stdout, stderr io.Writer) error {
	o, err := parseBackupFlags(args, getenv, stderr)
	if err != nil {
		return err
	}
	ctx, cancel := context.WithTimeout(ctx, o.server.timeout)
	defer cancel()
	client, closeConn, err := o.server.dial()
	if err != nil {
		return err
	}
	defer closeConn()
	w, err := bolt.CreateBackup(o.out)
	if err != nil {
		return err
	}
	header, n, err := writeBackup(ctx, client, w, o.keys, stderr)
	if err != nil {
		w.Abort()
		return err
	}
	if err := w.Publish(); err != nil {
		w.Abort()
		return err
	}
	checked := ""
	if o.keys != nil {
		checked = ", every record opens with key id " + o.keys.PrimaryID()
	}
	fmt.Fprintf(stdout, "backup: %d connections written to %s (%s%s%s)\n", n, o.out, header.GetStore(), atRevision(header), checked)
	return nil
}

// backupOptions is the backup command's command line.
type backupOptions struct {
	server serverFlags
	out    string
	keys   *storage.Keyring // set with --verify
}

func parseBackupFlags(args []string, getenv func(string) string, stderr io.Writer) (*backupOptions, error) {
	fs := newFlagSet("backup", "backup --server ADDR --out FILE [--verify --key-file F] [--cacert F --cert F --key F]", stderr)
	o := &backupOptions{}
	var kf keyFlag
	o.server.register(fs)
	kf.register(fs, "to check the backup with (--verify)")
	fs.StringVar(&o.out, "out", "", "file to write the backup to (replaced atomically if it exists)")
	verify := fs.Bool("verify", false, "re-open the written backup with the key and check that every record opens, before it takes the name of --out")
	if err := parseFlags(fs, args); err != nil {
		return nil, err
	}
	if o.out == "" {
		return nil, errors.New("--out is required")
	}
	if !*verify {
		return o, nil
	}
	keys, given, err := kf.load(getenv)
	switch {
	case err != nil:
		return nil, err
	case !given:
		return nil, errors.New("--verify needs --key-file or TOKENBROKER_KEY")
	}
	o.keys = keys
	return o, nil
}

// writeBackup receives the snapshot into w, finishes the file and, with
// keys, verifies it. It returns the header and the connection count.
func writeBackup(ctx context.Context, client adminv1.AdminBrokerClient, w *bolt.BackupWriter, keys *storage.Keyring, stderr io.Writer) (*adminv1.BackupHeader, int64, error) {
	header, err := receiveBackup(ctx, client, w, newProgress(stderr))
	if err != nil {
		return nil, 0, err
	}
	n, err := w.Finish()
	if err != nil {
		return nil, 0, err
	}
	if n != header.GetConnectionCount() {
		return nil, 0, fmt.Errorf("the server announced %d connections but sent %d; nothing written", header.GetConnectionCount(), n)
	}
	if keys != nil {
		if err := verifyBackup(w.TempPath(), keys, n); err != nil {
			return nil, 0, fmt.Errorf("verify: %w; nothing written", err)
		}
	}
	return header, n, nil
}

func atRevision(h *adminv1.BackupHeader) string {
	if h.GetEtcdRevision() == 0 {
		return ""
	}
	return fmt.Sprintf(" at revision %d", h.GetEtcdRevision())
}

// receiveBackup writes the streamed snapshot into w and returns its header.
func receiveBackup(ctx context.Context, client adminv1.AdminBrokerClient, w *bolt.BackupWriter, p *progress) (*adminv1.BackupHeader, error) {
	stream, err := client.Backup(ctx, &adminv1.BackupRequest{})
	if err != nil {
		return nil, err
	}
	defer p.done()
	var header *adminv1.BackupHeader
	var n int64
	for {
		msg, err := stream.Recv()
		if errors.Is(err, io.EOF) {
			break
		}
		if err != nil {
			return nil, err
		}
		if h := msg.GetHeader(); h != nil {
			if err := w.SetMeta(h.GetMeta()); err != nil {
				return nil, err
			}
			header = h
		}
		if header == nil {
			return nil, errors.New("the server sent records before the snapshot's header")
		}
		for _, r := range msg.GetRecords() {
			if err := w.Add(storage.Record{Name: r.GetName(), Connection: r.GetConnection(), Tokens: nilIfEmpty(r.GetTokens())}); err != nil {
				return nil, err
			}
		}
		n += int64(len(msg.GetRecords()))
		p.show("backup: %d of %d connections", n, header.GetConnectionCount())
	}
	if header == nil {
		return nil, errors.New("the server ended the backup without a header")
	}
	return header, nil
}

func nilIfEmpty(b []byte) []byte {
	if len(b) == 0 {
		return nil
	}
	return b
}

// verifyBackup re-opens the written file and checks every record with keys.
func verifyBackup(path string, keys *storage.Keyring, want int64) error {
	b, err := bolt.OpenBackup(path)
	if err != nil {
		return err
	}
	defer b.Close()
	n, err := b.Verify(keys)
	if err != nil {
		return err
	}
	if n != want {
		return fmt.Errorf("the file holds %d connections, not %d", n, want)
	}
	return nil
}
