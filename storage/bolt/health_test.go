package bolt_test

import (
	"context"
	"errors"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"syscall"
	"testing"

	"tokenbroker/storage"
)

// TestDamageWhileServingIsReported damages a page of the file while the
// store has it open: the read that meets it fails with ErrCorrupt instead
// of panicking, Healthy reports it from then on, and writes are refused.
func TestDamageWhileServingIsReported(t *testing.T) {
	path := populated(t, 300)
	p := layout(t, path)
	s := openStore(t, path, keyring(t, key(1)))
	ctx := context.Background()
	if err := s.Healthy(); err != nil {
		t.Fatalf("healthy store: %v", err)
	}
	patch(t, path, int64(p.connRoot)*int64(p.size), u64(p.connRoot+1000))
	if _, err := s.GetConnection(ctx, "tenants/t0007/connections/erp"); !errors.Is(err, storage.ErrCorrupt) {
		t.Fatalf("read of a damaged page: %v, want ErrCorrupt", err)
	}
	if err := s.Healthy(); !errors.Is(err, storage.ErrCorrupt) {
		t.Errorf("Healthy after a damaged read: %v, want ErrCorrupt", err)
	}
	if err := s.PutTokens(ctx, "tenants/t0007/connections/erp", sampleToken()); !errors.Is(err, storage.ErrCorrupt) {
		t.Errorf("write to a damaged file: %v, want ErrCorrupt", err)
	}
}

// TestFileGoneRefusesWrites takes the data file away from an open store in
// each way an operator or a cleanup job can: from then on Healthy names
// the path and says what happened, and every write is refused with
// ErrFileGone (a restart would not find it); reads still answer. When the
// file comes back under its name, writes and health come back.
func TestFileGoneRefusesWrites(t *testing.T) {
	for _, tc := range []struct {
		name    string
		takeOut func(t *testing.T, path string)
		putBack func(t *testing.T, path string)
		says    string
	}{
		{"deleted", func(t *testing.T, path string) {
			mustDo(t, os.Link(path, path+".kept"))
			mustDo(t, os.Remove(path))
		}, func(t *testing.T, path string) {
			mustDo(t, os.Link(path+".kept", path))
		}, "deleted or renamed"},
		{"renamed away", func(t *testing.T, path string) {
			mustDo(t, os.Rename(path, path+".moved"))
		}, func(t *testing.T, path string) {
			mustDo(t, os.Rename(path+".moved", path))
		}, "deleted or renamed"},
		{"replaced", func(t *testing.T, path string) {
			mustDo(t, os.Rename(path, path+".moved"))
			mustDo(t, os.WriteFile(path, []byte("restored from somewhere else"), 0o600))
		}, func(t *testing.T, path string) {
			mustDo(t, os.Rename(path+".moved", path))
		}, "replaced by another file"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			path := filepath.Join(t.TempDir(), "tokenbroker.db")
			s := openStore(t, path, keyring(t, key(1)))
			ctx := context.Background()
			const name = "tenants/a/connections/x"
			c, err := s.CreateConnection(ctx, sampleConn(name), sampleToken())
			if err != nil {
				t.Fatal(err)
			}
			tc.takeOut(t, path)
			err = s.Healthy()
			if !errors.Is(err, storage.ErrFileGone) || !strings.Contains(err.Error(), path) || !strings.Contains(err.Error(), tc.says) {
				t.Fatalf("Healthy: %v, want ErrFileGone naming %s and saying %q", err, path, tc.says)
			}
			if _, err := s.CreateConnection(ctx, sampleConn("tenants/a/connections/y"), nil); !errors.Is(err, storage.ErrFileGone) {
				t.Errorf("create: %v, want ErrFileGone", err)
			}
			if err := s.PutTokens(ctx, name, sampleToken()); !errors.Is(err, storage.ErrFileGone) {
				t.Errorf("put tokens: %v, want ErrFileGone", err)
			}
			if _, err := s.UpdateConnection(ctx, c, nil); !errors.Is(err, storage.ErrFileGone) {
				t.Errorf("update: %v, want ErrFileGone", err)
			}
			if err := s.DeleteConnection(ctx, name, 0); !errors.Is(err, storage.ErrFileGone) {
				t.Errorf("delete: %v, want ErrFileGone", err)
			}
			if _, err := s.GetConnection(ctx, name); err != nil {
				t.Errorf("read while the file is gone: %v", err)
			}
			tc.putBack(t, path)
			if err := s.Healthy(); err != nil {
				t.Fatalf("Healthy with the file back: %v", err)
			}
			if _, err := s.CreateConnection(ctx, sampleConn("tenants/a/connections/y"), nil); err != nil {
				t.Errorf("create with the file back: %v", err)
			}
		})
	}
}

func mustDo(t *testing.T, err error) {
	t.Helper()
	if err != nil {
		t.Fatal(err)
	}
}

// fsizeChild names the directory the child of TestFailingWritesAreUnhealthy
// works in; set only in that child.
const fsizeChild = "TOKENBROKER_TEST_FSIZE_DIR"

// TestFailingWritesAreUnhealthy makes the disk refuse writes for real: a
// child test process lowers its file size limit (RLIMIT_FSIZE) below what
// the data file needs to grow, so the kernel fails the store's writes with
// EFBIG. While writes fail Healthy says so (its probe write fails too);
// once the limit is raised again the probe succeeds and health comes back
// without any caller writing.
func TestFailingWritesAreUnhealthy(t *testing.T) {
	dir := os.Getenv(fsizeChild)
	if dir == "" {
		cmd := exec.Command(os.Args[0], "-test.run=^TestFailingWritesAreUnhealthy$", "-test.v", "-test.count=1")
		cmd.Env = append(os.Environ(), fsizeChild+"="+t.TempDir())
		out, err := cmd.CombinedOutput()
		if err != nil || !strings.Contains(string(out), "--- PASS: TestFailingWritesAreUnhealthy") {
			t.Fatalf("child: %v\n%s", err, out)
		}
		return
	}
	var limit syscall.Rlimit
	mustDo(t, syscall.Getrlimit(syscall.RLIMIT_FSIZE, &limit))
	s := openStore(t, filepath.Join(dir, "tokenbroker.db"), keyring(t, key(1)))
	ctx := context.Background()
	low := limit
	low.Cur = 256 << 10
	mustDo(t, syscall.Setrlimit(syscall.RLIMIT_FSIZE, &low))
	big := sampleToken()
	big.AccessToken = strings.Repeat("a", 4000)
	var werr error
	for i := 0; i < 1000 && werr == nil; i++ {
		_, werr = s.CreateConnection(ctx, sampleConn(fmt.Sprintf("tenants/a/connections/c%04d", i)), big)
	}
	if werr == nil {
		t.Fatal("1000 writes of 4 KB passed a 256 KB file size limit")
	}
	t.Logf("write refused by the disk: %v", werr)
	if err := s.Healthy(); err == nil {
		t.Fatal("Healthy while every write fails: nil")
	}
	if err := s.Healthy(); err == nil {
		t.Fatal("Healthy asked again while writes fail: nil")
	}
	mustDo(t, syscall.Setrlimit(syscall.RLIMIT_FSIZE, &limit))
	if err := s.Healthy(); err != nil {
		t.Fatalf("Healthy once the disk takes writes again: %v", err)
	}
	if _, err := s.CreateConnection(ctx, sampleConn("tenants/a/connections/after"), big); err != nil {
		t.Fatalf("write after the limit was raised: %v", err)
	}
}
