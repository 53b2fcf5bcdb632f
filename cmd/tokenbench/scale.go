package main

import (
	"bufio"
	"context"
	"encoding/base64"
	"fmt"
	"io"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"time"

	"golang.org/x/sys/unix"
	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials/insecure"

	pb "tokenbroker/gen/tokenbroker/v1"

	"tokenbroker/storage"
	"tokenbroker/storage/bolt"
)

// ScaleResult is one connection count: the real binary's start, memory
// and commit cost on a data file holding that many connections.
type ScaleResult struct {
	Conns  int
	FileMB float64
	// ColdMS and WarmMS are exec to serving (cold: the file's pages
	// evicted), LoadColdMS and LoadWarmMS exec to every connection loaded.
	ColdMS, WarmMS, LoadColdMS, LoadWarmMS float64
	RSSMB, AnonMB, FileRSSMB               float64 // when loaded
	// ServedMB is the resident memory after a token of every connection
	// was served over gRPC, at ServedRate tokens per second.
	ServedMB, ServedRate     float64
	CommitP50MS, CommitP99MS float64
	// FloorP50MS and FloorP99MS are two raw 4 KiB writes with fdatasync,
	// interleaved with the commits.
	FloorP50MS, FloorP99MS float64
}

// scaleTargets are the targets at 100k connections (none at other sizes).
func (s *ScaleResult) targets() []Target {
	if s.Conns != 100000 {
		return nil
	}
	t := func(name, unit string, got, limit float64) Target {
		return Target{Section: "scale", Name: "100k connections: " + name, Unit: unit, Measured: got, Op: "at most", Limit: limit}
	}
	commit := t("commit p99", "ms", s.CommitP99MS, 2)
	commit.Note = fmt.Sprintf("raw two-fsync floor p99 %.2f ms", s.FloorP99MS)
	return []Target{t("serving, warm start", "ms", s.WarmMS, 500), t("serving, cold start", "ms", s.ColdMS, 1000),
		t("resident memory when loaded", "MB", s.RSSMB, 300), t("resident memory after serving every connection", "MB", s.ServedMB, 300), commit}
}

// populate writes n connections with token state into a data file
// through the store (sealed, group-committed), 256 at a time.
func populate(path string, keys *storage.Keyring, n int) {
	st := must(bolt.Open(path, bolt.Options{Keyring: keys}))
	defer st.Close()
	now, scopes := time.Now(), []string{"api", "offline_access"}
	check(parallel(n, 256, func(i int) error {
		_, err := st.CreateConnection(context.Background(), &storage.Connection{
			Name: scaleName(i), DisplayName: "ERP", InstanceURL: "https://erp-" + strconv.Itoa(i) + ".example.com",
			ClientID: clientID, ClientSecret: clientSecret + strconv.Itoa(i), Username: username, Password: password,
			Scopes: scopes, CreateTime: now, UpdateTime: now,
		}, &storage.Tokens{
			Generation: 1, RefreshToken: "rt-" + strconv.Itoa(i) + strings.Repeat("r", 40), AccessToken: "at-" + strings.Repeat("a", 900),
			TokenType: "Bearer", IssueTime: now, AccessTokenExpireTime: now.Add(time.Hour), ChainStartTime: now,
			RefreshTokenUseTime: now, Scopes: scopes, State: "ACTIVE",
		})
		return err
	}))
}

func scaleName(i int) string { return fmt.Sprintf("tenants/t%06d/connections/erp", i) }

// dropFromPageCache asks the kernel to evict the file's cached pages.
func dropFromPageCache(path string) {
	f := must(os.Open(path))
	defer f.Close()
	check(unix.Fadvise(int(f.Fd()), 0, 0, unix.FADV_DONTNEED))
}

// started is what one start of the binary measured.
type started struct {
	serving, loaded time.Duration // exec until serving, until every connection is loaded
	loadedRSS       rss           // resident memory when loaded
	servedRSS       rss           // resident memory after every connection was served (serveAll)
	serveRate       float64       // tokens served per second then
}

// startBinary runs the server on dir and measures exec until it serves,
// exec until every connection is loaded, and resident memory then. With
// serveAll > 0 it then asks for a token of each of the serveAll
// connections through gRPC and reads resident memory again.
func startBinary(bin, dir string, key []byte, serveAll int) started {
	var res started
	cmd := exec.Command(bin, "--data-dir", dir, "--listen", "127.0.0.1:0", "--log-format", "text", "--allow-insecure-upstream")
	cmd.Env = append(os.Environ(), "TOKENBROKER_KEY="+base64.StdEncoding.EncodeToString(key))
	stderr := must(cmd.StderrPipe())
	t0 := time.Now()
	check(cmd.Start())
	defer func() {
		cmd.Process.Signal(os.Interrupt)
		cmd.Wait()
	}()
	sc := bufio.NewScanner(stderr)
	var addr string
	var output []string
	for sc.Scan() {
		line := sc.Text()
		output = append(output, line)
		if i := strings.Index(line, "serving on"); res.serving == 0 && i >= 0 {
			res.serving = time.Since(t0)
			if f := strings.Fields(line[i:]); len(f) > 2 {
				addr = f[2]
			}
		}
		if strings.Contains(line, "tokenbroker: loaded") {
			res.loaded = time.Since(t0)
			res.loadedRSS = readRSS(cmd.Process.Pid)
			go io.Copy(io.Discard, stderr)
			if serveAll > 0 {
				t1 := time.Now()
				getEveryToken(addr, serveAll)
				res.serveRate = float64(serveAll) / time.Since(t1).Seconds()
				res.servedRSS = readRSS(cmd.Process.Pid)
			}
			return res
		}
	}
	check(fmt.Errorf("server did not start: %s", strings.Join(output, "\n")))
	return res
}

// rss is resident memory in KiB: anonymous (heap, stacks) and file-backed
// (the data file's memory map, the binary).
type rss struct{ total, anon, file int64 }

func readRSS(pid int) rss {
	var r rss
	b := must(os.ReadFile(fmt.Sprintf("/proc/%d/status", pid)))
	for _, line := range strings.Split(string(b), "\n") {
		for key, dst := range map[string]*int64{"VmRSS:": &r.total, "RssAnon:": &r.anon, "RssFile:": &r.file} {
			if v, ok := strings.CutPrefix(line, key); ok {
				if f := strings.Fields(v); len(f) > 0 {
					*dst, _ = strconv.ParseInt(f[0], 10, 64)
				}
			}
		}
	}
	return r
}

func benchScale(root, bin string, n int) *ScaleResult {
	dir := mkdir(root, fmt.Sprintf("scale-%d", n))
	defer os.RemoveAll(dir)
	key := make([]byte, 32)
	keys, _ := storage.NewKeyring(key)
	path := filepath.Join(dir, "tokenbroker.db")
	t0 := time.Now()
	populate(path, keys, n)
	logf("scale: %d connections written in %v", n, time.Since(t0).Round(time.Millisecond))
	res := &ScaleResult{Conns: n}
	if info, err := os.Stat(path); err == nil {
		res.FileMB = float64(info.Size()) / 1e6
	}
	var warm, cold, loadW, loadC []time.Duration
	var rsss []rss
	for i := range 3 {
		dropFromPageCache(path)
		c := startBinary(bin, dir, key, 0)
		cold, loadC = append(cold, c.serving), append(loadC, c.loaded)
		w := startBinary(bin, dir, key, 0)
		warm, loadW, rsss = append(warm, w.serving), append(loadW, w.loaded), append(rsss, w.loadedRSS)
		logf("scale: %d connections, start %d: cold %v (loaded %v), warm %v (loaded %v)", n, i+1,
			c.serving.Round(time.Millisecond), c.loaded.Round(time.Millisecond), w.serving.Round(time.Millisecond), w.loaded.Round(time.Millisecond))
	}
	// Then a warm start that serves every connection.
	w := startBinary(bin, dir, key, n)
	res.ServedMB, res.ServedRate = float64(w.servedRSS.total)/1024, w.serveRate
	res.ColdMS, res.WarmMS = ms(medianDur(cold)), ms(medianDur(warm))
	res.LoadColdMS, res.LoadWarmMS = ms(medianDur(loadC)), ms(medianDur(loadW))
	slices.SortFunc(rsss, func(a, b rss) int { return int(a.total - b.total) })
	m := rsss[len(rsss)/2]
	res.RSSMB, res.AnonMB, res.FileRSSMB = float64(m.total)/1024, float64(m.anon)/1024, float64(m.file)/1024
	commitCost(dir, path, keys, n, res)
	return res
}

// commitCost times sequential commits on random connections, each paired
// with a raw baseline on the same file system: a 4 KiB page write and
// fdatasync, then a 4 KiB meta write and fdatasync, the floor of any B+tree
// commit that flips a meta page (bbolt's does exactly this). Interleaving
// makes both see the same disk.
func commitCost(dir, path string, keys *storage.Keyring, n int, res *ScaleResult) {
	st := must(bolt.Open(path, bolt.Options{Keyring: keys}))
	defer st.Close()
	tok := must(st.GetTokens(context.Background(), scaleName(0)))
	raw := must(os.OpenFile(filepath.Join(dir, "fsync-baseline"), os.O_CREATE|os.O_RDWR, 0o600))
	defer raw.Close()
	page := make([]byte, 4096)
	var seq, floor []time.Duration
	for i := range commitSamples {
		name := scaleName((i * 7919) % n)
		t0 := time.Now()
		check(st.PutTokens(context.Background(), name, tok))
		seq = append(seq, time.Since(t0))
		t0 = time.Now()
		rawCommit(raw, page, int64(1+i%256))
		floor = append(floor, time.Since(t0))
	}
	c50, c99 := percentiles(seq)
	f50, f99 := percentiles(floor)
	res.CommitP50MS, res.CommitP99MS, res.FloorP50MS, res.FloorP99MS = ms(c50), ms(c99), ms(f50), ms(f99)
}

// commitSamples is how many sequential commits (and raw baselines) are
// timed per size: enough that p99 is not one unlucky sample.
const commitSamples = 1000

// rawCommit writes a page at index pg and syncs, then writes page 0 and
// syncs.
func rawCommit(f *os.File, page []byte, pg int64) {
	check(errOf(f.WriteAt(page, pg*int64(len(page)))))
	check(unix.Fdatasync(int(f.Fd())))
	check(errOf(f.WriteAt(page, 0)))
	check(unix.Fdatasync(int(f.Fd())))
}

// getEveryToken asks the server at addr for a token of each of the n
// connections populate wrote, 32 at a time.
func getEveryToken(addr string, n int) {
	cc := must(grpc.NewClient(addr, grpc.WithTransportCredentials(insecure.NewCredentials())))
	defer cc.Close()
	client := pb.NewTokenBrokerClient(cc)
	check(parallel(n, 32, func(i int) error {
		r, err := client.GetAccessToken(context.Background(), &pb.GetAccessTokenRequest{Name: scaleName(i)})
		if err == nil && r.GetAccessToken() == "" {
			err = fmt.Errorf("%s: empty token", scaleName(i))
		}
		return err
	}))
}
