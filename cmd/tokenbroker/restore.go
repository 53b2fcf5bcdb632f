package main

import (
	"context"
	"errors"
	"fmt"
	"io"
	"os"

	"tokenbroker/storage"
	"tokenbroker/storage/bolt"
	"tokenbroker/storage/etcd"
)

// restoreCmd writes a backup into a stopped broker's data dir or into an
// etcd prefix no replica serves, all or nothing, after checking that the
// key opens every record.
func restoreCmd(ctx context.Context, args []string, getenv func(string) string, stdout, stderr io.Writer) error {
	fs := newFlagSet("restore", "restore --from FILE (--data-dir DIR | --etcd-endpoints URLS [--etcd-prefix P]) --key-file F [--replace]", stderr)
	var kf keyFlag
	cfg := &config{}
	kf.register(fs, "that opens the backup (required); the restored records are sealed with its first key")
	from := fs.String("from", "", "backup file written by tokenbroker backup (or a stopped broker's tokenbroker.db)")
	replace := fs.Bool("replace", false, "bbolt: replace the data file if it exists; etcd: replace connections of the same names")
	fs.StringVar(&cfg.dataDir, "data-dir", "", "restore into the bbolt data file in this directory (refused while a broker uses it)")
	fs.StringVar(&cfg.etcdEndpoints, "etcd-endpoints", "", "restore into etcd (comma-separated endpoints); refused while replicas run on the prefix")
	fs.StringVar(&cfg.etcdPrefix, "etcd-prefix", "/tokenbroker/", "key prefix in etcd")
	fs.StringVar(&cfg.etcdCA, "etcd-ca", "", "CA bundle (PEM) for etcd's certificates")
	fs.StringVar(&cfg.etcdCert, "etcd-cert", "", "client certificate (PEM) for etcd")
	fs.StringVar(&cfg.etcdKey, "etcd-key", "", "client key (PEM) for etcd")
	if err := parseFlags(fs, args); err != nil {
		return err
	}
	switch {
	case *from == "":
		return errors.New("--from is required")
	case (cfg.dataDir == "") == (cfg.etcdEndpoints == ""):
		return errors.New("give exactly one of --data-dir and --etcd-endpoints")
	}
	keys, given, err := kf.load(getenv)
	if err != nil {
		return err
	}
	if !given {
		return errors.New("--key-file (or TOKENBROKER_KEY) is required: the key that sealed the backup")
	}
	src, err := bolt.OpenBackup(*from)
	if err != nil {
		return err
	}
	defer src.Close()
	var n int64
	var where string
	if cfg.dataDir != "" {
		n, where, err = restoreBolt(cfg, src, keys, *replace)
	} else {
		n, where, err = restoreEtcd(ctx, cfg, src, keys, *replace)
	}
	if err != nil {
		return err
	}
	fmt.Fprintf(stdout, "restore: %d connections from %s written to %s, sealed with key id %s; each chain is checked at its first refresh (a refresh token rotated since the backup costs one password grant)\n",
		n, *from, where, keys.PrimaryID())
	return nil
}

func restoreBolt(cfg *config, src *bolt.Backup, keys *storage.Keyring, replace bool) (int64, string, error) {
	if err := os.MkdirAll(cfg.dataDir, 0o700); err != nil {
		return 0, "", fmt.Errorf("data dir: %w", err)
	}
	path := dataFile(cfg)
	n, err := bolt.Restore(path, src, bolt.RestoreOptions{Keyring: keys, Replace: replace})
	return n, path, err
}

func restoreEtcd(ctx context.Context, cfg *config, src *bolt.Backup, keys *storage.Keyring, replace bool) (int64, string, error) {
	cli, err := newEtcdClient(cfg)
	if err != nil {
		return 0, "", err
	}
	defer cli.Close()
	n, err := etcd.Restore(ctx, src, etcd.RestoreOptions{Client: cli, Prefix: cfg.etcdPrefix, Keyring: keys, Replace: replace})
	return n, "etcd " + cfg.etcdEndpoints + " " + cfg.etcdPrefix, err
}
