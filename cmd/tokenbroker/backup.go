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
	fs := newFlagSet("backup", "backup --server ADDR --out FILE [--verify --key-file F] [--cacert F --cert F --key F]", stderr)
	var sf serverFlags
	var kf keyFlag
	sf.register(fs)
	kf.register(fs, "to check the backup with (--verify)")
	out := fs.String("out", "", "file to write the backup to (replaced atomically if it exists)")
	verify := fs.Bool("verify", false, "re-open the written backup with the key and check that every record opens, before it takes the name of --out")
	if err := parseFlags(fs, args); err != nil {
		return err
	}
	if *out == "" {
		return errors.New("--out is required")
	}
	keys, given, err := kf.load(getenv)
	if err != nil {
		return err
	}
	if *verify && !given {
		return errors.New("--verify needs --key-file or TOKENBROKER_KEY")
	}
	ctx, cancel := context.WithTimeout(ctx, sf.timeout)
	defer cancel()
	client, closeConn, err := sf.dial()
	if err != nil {
		return err
	}
	defer closeConn()
	w, err := bolt.CreateBackup(*out)
	if err != nil {
		return err
	}
	published := false
	defer func() {
		if !published {
			w.Abort()
		}
	}()
	header, err := receiveBackup(ctx, client, w, newProgress(stderr))
	if err != nil {
		return err
	}
	n, err := w.Finish()
	if err != nil {
		return err
	}
	if n != header.GetConnectionCount() {
		return fmt.Errorf("the server announced %d connections but sent %d; nothing written", header.GetConnectionCount(), n)
	}
	checked := ""
	if *verify {
		if err := verifyBackup(w.TempPath(), keys, n); err != nil {
			return fmt.Errorf("verify: %w; nothing written", err)
		}
		checked = ", every record opens with key id " + keys.PrimaryID()
	}
	if err := w.Publish(); err != nil {
		return err
	}
	published = true
	fmt.Fprintf(stdout, "backup: %d connections written to %s (%s%s%s)\n", n, *out, header.GetStore(), atRevision(header), checked)
	return nil
}

func atRevision(h *adminv1.BackupHeader) string {
	if h.GetEtcdRevision() == 0 {
		return ""
	}
	return fmt.Sprintf(" at revision %d", h.GetEtcdRevision())
}

// receiveBackup writes the streamed snapshot into w and returns its header.
func receiveBackup(ctx context.Context, client adminv1.AdminClient, w *bolt.BackupWriter, p *progress) (*adminv1.BackupHeader, error) {
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
