package storage_test

import (
	"bytes"
	"os"
	"path/filepath"
	"testing"

	"tokenbroker/storage"
)

func TestKeyFile(t *testing.T) {
	dir := t.TempDir()
	path := filepath.Join(dir, "k")
	k, generated, err := storage.LoadOrGenerateKeyFile(path)
	if err != nil || !generated {
		t.Fatalf("generate: %v %v", generated, err)
	}
	info, _ := os.Stat(path)
	if info.Mode().Perm() != 0o600 {
		t.Errorf("mode = %v, want 0600", info.Mode().Perm())
	}
	k2, generated, err := storage.LoadOrGenerateKeyFile(path)
	if err != nil || generated || k2.PrimaryID() != k.PrimaryID() {
		t.Errorf("reload: %v %v", generated, err)
	}
	for _, mode := range []os.FileMode{0o644, 0o604, 0o660, 0o620} {
		os.Chmod(path, mode)
		if _, err := storage.LoadKeyFile(path); err == nil {
			t.Errorf("key file of mode %v accepted", mode)
		}
	}
	// A Kubernetes Secret mounted with the pod's fsGroup.
	for _, mode := range []os.FileMode{0o440, 0o640, 0o400} {
		os.Chmod(path, mode)
		if _, err := storage.LoadKeyFile(path); err != nil {
			t.Errorf("key file of mode %v: %v", mode, err)
		}
	}
	if _, err := storage.ParseKeys([]byte("!!!notbase64")); err == nil || bytes.Contains([]byte(err.Error()), []byte("notbase64")) {
		t.Errorf("bad key: %v (must fail without echoing the line)", err)
	}
}
