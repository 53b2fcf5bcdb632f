package bolt_test

import (
	"context"
	"encoding/binary"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"

	bbolt "go.etcd.io/bbolt"

	"tokenbroker/internal/testkit"
	"tokenbroker/storage"
	"tokenbroker/storage/bolt"
)

// populated returns a closed data file holding n connections with tokens.
func populated(t *testing.T, n int) string {
	t.Helper()
	path := filepath.Join(t.TempDir(), "tokenbroker.db")
	s := openStore(t, path, keyring(t, key(1)))
	var wg sync.WaitGroup
	for i := range n {
		wg.Go(func() { // concurrent: the group committer shares the fsyncs
			if _, err := s.CreateConnection(context.Background(), sampleConn(fmt.Sprintf("tenants/t%04d/connections/erp", i)), sampleToken()); err != nil {
				t.Error(err)
			}
		})
	}
	wg.Wait()
	if err := s.Close(); err != nil {
		t.Fatal(err)
	}
	return path
}

// pages describes a data file's pages, read with bbolt itself.
type pages struct {
	size     int                 // page size
	used     int64               // bytes up to the last page in use (the file may be longer)
	connRoot uint64              // root page of the connections bucket
	byType   map[string][]uint64 // page ids by type: leaf, branch, freelist, free
}

func layout(t *testing.T, path string) pages {
	t.Helper()
	db, err := bbolt.Open(path, 0o600, &bbolt.Options{ReadOnly: true, PreLoadFreelist: true})
	if err != nil {
		t.Fatal(err)
	}
	defer db.Close()
	p := pages{size: db.Info().PageSize, byType: map[string][]uint64{}}
	err = db.View(func(tx *bbolt.Tx) error {
		p.connRoot = uint64(tx.Bucket([]byte("connections")).Root())
		p.used = tx.Size()
		for id := 2; ; id++ {
			info, err := tx.Page(id)
			if err != nil {
				return err
			}
			if info == nil {
				return nil
			}
			p.byType[info.Type] = append(p.byType[info.Type], uint64(id))
			id += info.OverflowCount
		}
	})
	if err != nil {
		t.Fatal(err)
	}
	return p
}

// patch writes b at offset off of the file.
func patch(t *testing.T, path string, off int64, b []byte) {
	t.Helper()
	f, err := os.OpenFile(path, os.O_RDWR, 0)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	if _, err := f.WriteAt(b, off); err != nil {
		t.Fatal(err)
	}
}

func u64(v uint64) []byte { return binary.LittleEndian.AppendUint64(nil, v) }

// TestOpenRefusesDamagedPages damages a real data file the ways disks and
// careless copies do, and opens it: every one is refused at Open with
// ErrCorrupt on one line that says to restore from a backup, nothing
// panics or faults, the file is unchanged, and its lock is released.
func TestOpenRefusesDamagedPages(t *testing.T) {
	for _, tc := range []struct {
		name   string
		damage func(t *testing.T, path string, p pages)
	}{
		{"page claims another id", func(t *testing.T, path string, p pages) {
			patch(t, path, int64(p.connRoot)*int64(p.size), u64(p.connRoot+1000))
		}},
		{"leaf elements overwritten", func(t *testing.T, path string, p pages) {
			leaf := p.byType["leaf"][len(p.byType["leaf"])/2]
			patch(t, path, int64(leaf)*int64(p.size)+16, []byte(strings.Repeat("\xff", 64)))
		}},
		{"branch points past the end", func(t *testing.T, path string, p pages) {
			if !contains(p.byType["branch"], p.connRoot) {
				t.Fatalf("sanity: connections root %d is not a branch page (%v)", p.connRoot, p.byType)
			}
			// The first branch element: pos, ksize (uint32 each), then pgid.
			patch(t, path, int64(p.connRoot)*int64(p.size)+16+8, u64(1<<40))
		}},
		{"truncated copy", func(t *testing.T, path string, p pages) {
			// Half the pages in use: bbolt grows the file ahead of them.
			if err := os.Truncate(path, p.used/2/int64(p.size)*int64(p.size)); err != nil {
				t.Fatal(err)
			}
		}},
		{"free list overwritten", func(t *testing.T, path string, p pages) {
			fl := p.byType["freelist"][0]
			patch(t, path, int64(fl)*int64(p.size)+8, []byte{0xff, 0xff})
		}},
		{"both meta pages damaged", func(t *testing.T, path string, p pages) {
			patch(t, path, 16+40, []byte{0x5a})
			patch(t, path, int64(p.size)+16+40, []byte{0x5a})
		}},
		{"free list names a page in use", func(t *testing.T, path string, p pages) {
			fl := p.byType["freelist"][0]
			// One free page id (count at header offset 10), and it is a leaf in use.
			patch(t, path, int64(fl)*int64(p.size)+10, []byte{1, 0})
			patch(t, path, int64(fl)*int64(p.size)+16, u64(p.byType["leaf"][0]))
		}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			path := populated(t, 300)
			tc.damage(t, path, layout(t, path))
			before := testkit.FileSum(t, path)
			_, err := bolt.Open(path, bolt.Options{Keyring: keyring(t, key(1)), LockTimeout: 200 * time.Millisecond})
			if !errors.Is(err, storage.ErrCorrupt) {
				t.Fatalf("Open: %v, want ErrCorrupt", err)
			}
			msg := err.Error()
			if strings.Contains(msg, "\n") || !strings.Contains(msg, "restore it from a backup") || !strings.Contains(msg, path) {
				t.Errorf("error is not one clear line naming the file and the remedy: %q", msg)
			}
			if testkit.FileSum(t, path) != before {
				t.Error("Open changed the damaged file")
			}
			// The failed Open let go of the file: opening again is refused
			// for the damage, not for a lock still held.
			if _, err := bolt.Open(path, bolt.Options{Keyring: keyring(t, key(1)), LockTimeout: 200 * time.Millisecond}); !errors.Is(err, storage.ErrCorrupt) {
				t.Errorf("second Open: %v, want ErrCorrupt", err)
			}
		})
	}
}

func contains(ids []uint64, id uint64) bool {
	for _, v := range ids {
		if v == id {
			return true
		}
	}
	return false
}
