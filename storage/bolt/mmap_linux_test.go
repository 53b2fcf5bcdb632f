package bolt_test

import (
	"bufio"
	"context"
	"fmt"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"testing"

	"tokenbroker/storage"
	"tokenbroker/storage/bolt"
	"tokenbroker/storage/storetest"
)

// mappedKB returns how much of path's memory map is resident in this
// process, from /proc/self/smaps.
func mappedKB(t *testing.T, path string) int {
	t.Helper()
	f, err := os.Open("/proc/self/smaps")
	if err != nil {
		t.Skip("no /proc/self/smaps:", err)
	}
	defer f.Close()
	total, in := 0, false
	sc := bufio.NewScanner(f)
	for sc.Scan() {
		fields := strings.Fields(sc.Text())
		switch {
		case len(fields) >= 5 && strings.Contains(fields[0], "-") && !strings.HasSuffix(fields[0], ":"):
			in = len(fields) >= 6 && fields[5] == path
		case in && len(fields) >= 2 && fields[0] == "Rss:":
			kb, _ := strconv.Atoi(fields[1])
			total += kb
		}
	}
	return total
}

// LoadAll drops the file's pages from the resident set when it is done, and
// the store reads them back as before.
func TestLoadAllDropsMappedPages(t *testing.T) {
	path := filepath.Join(t.TempDir(), "db")
	k := keyring(t, key(1))
	s, err := bolt.Open(path, bolt.Options{Keyring: k, Populate: true})
	if err != nil {
		t.Fatal(err)
	}
	defer s.Close()
	ctx := context.Background()
	const n = 3000
	big := sampleToken()
	big.AccessToken = strings.Repeat("a", 1000)
	var wg sync.WaitGroup
	for i := range n {
		wg.Go(func() { // concurrent: the group committer shares the fsyncs
			c := sampleConn(fmt.Sprintf("tenants/t/connections/c%05d", i))
			if _, err := s.CreateConnection(ctx, c, big); err != nil {
				t.Error(err)
			}
		})
	}
	wg.Wait()
	var loaded atomic.Int64
	before := 0
	if err := s.LoadAll(ctx, func(c *storage.Connection, tok *storage.Tokens) error {
		if loaded.Add(1) == n/2 {
			before = mappedKB(t, path) // mid-load: the pages being read are resident
		}
		if tok.AccessToken != big.AccessToken || c.Password != storetest.Password {
			return fmt.Errorf("%s decoded wrong", c.Name)
		}
		return nil
	}); err != nil {
		t.Fatal(err)
	}
	after := mappedKB(t, path)
	t.Logf("data file resident: %d KB during the load, %d KB after", before, after)
	if before < 1024 {
		t.Fatalf("only %d KB of the map resident during the load: the measurement does not see the map", before)
	}
	if after > before/10 {
		t.Errorf("%d KB of the map still resident after LoadAll (%d KB during)", after, before)
	}
	// Values decoded before the drop are intact, and the store reads again.
	got, err := s.GetTokens(ctx, "tenants/t/connections/c00042")
	if err != nil || got.AccessToken != big.AccessToken {
		t.Fatalf("read after drop: %v", err)
	}
}
