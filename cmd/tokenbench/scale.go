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
	"sync"
	"time"

	"golang.org/x/sys/unix"
	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials/insecure"

	pb "tokenbroker/gen/tokenbroker/v1"

	"tokenbroker/broker"
	"tokenbroker/storage"
	"tokenbroker/storage/bolt"
)

type scaleResult struct {
	conns                    int
	fileBytes                int64
	startWarm, startCold     time.Duration // exec to serving
	loadedWarm, loadedCold   time.Duration // exec to every connection loaded
	rssWarmKB                int64         // total resident
	rssAnonKB, rssFileKB     int64         // of which anonymous / file-backed
	servedRSS                []int64       // total resident (KiB) after serving every connection: Go defaults, then each of memLimits
	servedRate               []float64     // tokens served per second then
	commitP50, commitP99     time.Duration // one sequential commit
	floorP50, floorP99       time.Duration // two raw page writes with fdatasync, interleaved with the commits
	groupWrites, groupCommit int64         // concurrent writes and the commits that carried them
	groupThroughput          float64       // writes per second
}

// populate writes n connections with token state straight into a data
// file, through the store (sealed, group-committed).
func populate(path string, keys *storage.Keyring, n int) error {
	st, err := bolt.Open(path, bolt.Options{Keyring: keys})
	if err != nil {
		return err
	}
	defer st.Close()
	return populateStore(st, n)
}

// populateStore writes n connections with token state through st, 256 at
// a time.
func populateStore(st broker.Store, n int) error {
	now := time.Now()
	var wg sync.WaitGroup
	sem := make(chan struct{}, 256)
	errs := make(chan error, 1)
	for i := range n {
		wg.Add(1)
		sem <- struct{}{}
		go func() {
			defer wg.Done()
			defer func() { <-sem }()
			name := fmt.Sprintf("tenants/t%06d/connections/erp", i)
			_, err := st.CreateConnection(context.Background(), &storage.Connection{
				Name: name, DisplayName: "ERP", InstanceURL: "https://erp-" + strconv.Itoa(i) + ".example.com",
				ClientID: clientID, ClientSecret: clientSecret + strconv.Itoa(i), Username: username, Password: password,
				Scopes: []string{"api", "offline_access"}, CreateTime: now, UpdateTime: now,
			}, &storage.Tokens{
				Generation: 1, RefreshToken: "rt-" + strconv.Itoa(i) + strings.Repeat("r", 40), AccessToken: "at-" + strings.Repeat("a", 900),
				TokenType: "Bearer", IssueTime: now, AccessTokenExpireTime: now.Add(time.Hour), ChainStartTime: now,
				RefreshTokenUseTime: now, Scopes: []string{"api", "offline_access"}, State: "ACTIVE",
			})
			if err != nil {
				select {
				case errs <- err:
				default:
				}
			}
		}()
	}
	wg.Wait()
	select {
	case err := <-errs:
		return err
	default:
		return nil
	}
}

// dropFromPageCache asks the kernel to evict the file's cached pages.
func dropFromPageCache(path string) error {
	f, err := os.Open(path)
	if err != nil {
		return err
	}
	defer f.Close()
	return unix.Fadvise(int(f.Fd()), 0, 0, unix.FADV_DONTNEED)
}

// started is what one start of the binary measured.
type started struct {
	serving, loaded time.Duration // exec until serving, until every connection is loaded
	loadedRSS       rss           // resident memory when loaded
	servedRSS       rss           // resident memory after every connection was served (serveAll)
	serveRate       float64       // tokens served per second then
}

// startBinary runs the server on dir (with env added to its environment)
// and measures exec until it serves, exec until every connection is loaded,
// and resident memory then. With serveAll > 0 it then asks for a token of
// each of the serveAll connections through gRPC and reads resident memory
// again.
func startBinary(bin, dir string, key []byte, serveAll int, env ...string) (started, error) {
	var res started
	cmd := exec.Command(bin, "--data-dir", dir, "--listen", "127.0.0.1:0", "--log-format", "text", "--allow-insecure-upstream")
	cmd.Env = append(os.Environ(), "TOKENBROKER_KEY="+base64.StdEncoding.EncodeToString(key))
	cmd.Env = append(cmd.Env, env...)
	stderr, err := cmd.StderrPipe()
	if err != nil {
		return res, err
	}
	t0 := time.Now()
	if err := cmd.Start(); err != nil {
		return res, err
	}
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
				if err := getEveryToken(addr, serveAll); err != nil {
					return res, err
				}
				res.serveRate = float64(serveAll) / time.Since(t1).Seconds()
				res.servedRSS = readRSS(cmd.Process.Pid)
			}
			return res, nil
		}
	}
	return res, fmt.Errorf("server did not start: %s", strings.Join(output, "\n"))
}

// rss is resident memory in KiB: anonymous (heap, stacks) and file-backed
// (the data file's memory map, the binary).
type rss struct{ total, anon, file int64 }

func readRSS(pid int) rss {
	var r rss
	b, err := os.ReadFile(fmt.Sprintf("/proc/%d/status", pid))
	if err != nil {
		return r
	}
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

func benchScale(root, bin string, n int, logf func(string, ...any)) (*scaleResult, error) {
	dir := filepath.Join(root, fmt.Sprintf("scale-%d", n))
	if err := os.MkdirAll(dir, 0o700); err != nil {
		return nil, err
	}
	key := make([]byte, 32)
	keys, _ := storage.NewKeyring(key)
	path := filepath.Join(dir, "tokenbroker.db")
	t0 := time.Now()
	if err := populate(path, keys, n); err != nil {
		return nil, err
	}
	logf("scale: %d connections written in %v", n, time.Since(t0).Round(time.Millisecond))
	res := &scaleResult{conns: n}
	if info, err := os.Stat(path); err == nil {
		res.fileBytes = info.Size()
	}
	var warm, cold, loadW, loadC []time.Duration
	var rsss []rss
	for i := range 3 {
		if err := dropFromPageCache(path); err != nil {
			return nil, err
		}
		c, err := startBinary(bin, dir, key, 0)
		if err != nil {
			return nil, err
		}
		cold, loadC = append(cold, c.serving), append(loadC, c.loaded)
		w, err := startBinary(bin, dir, key, 0)
		if err != nil {
			return nil, err
		}
		warm, loadW, rsss = append(warm, w.serving), append(loadW, w.loaded), append(rsss, w.loadedRSS)
		logf("scale: %d connections, start %d: cold %v (loaded %v), warm %v (loaded %v)", n, i+1,
			c.serving.Round(time.Millisecond), c.loaded.Round(time.Millisecond), w.serving.Round(time.Millisecond), w.loaded.Round(time.Millisecond))
	}
	// Then warm starts that serve every connection: with the Go runtime's
	// defaults, and under each soft memory limit.
	for i := range 1 + len(memLimits) {
		var env []string
		if i > 0 {
			env = []string{"GOMEMLIMIT=" + memLimits[i-1]}
		}
		w, err := startBinary(bin, dir, key, n, env...)
		if err != nil {
			return nil, err
		}
		res.servedRSS, res.servedRate = append(res.servedRSS, w.servedRSS.total), append(res.servedRate, w.serveRate)
	}
	res.startCold, res.startWarm = medianDur(cold), medianDur(warm)
	res.loadedCold, res.loadedWarm = medianDur(loadC), medianDur(loadW)
	slices.SortFunc(rsss, func(a, b rss) int { return int(a.total - b.total) })
	m := rsss[len(rsss)/2]
	res.rssWarmKB, res.rssAnonKB, res.rssFileKB = m.total, m.anon, m.file

	// Commit cost as the file grows: sequential commits, then concurrent
	// writers sharing commits.
	st, err := bolt.Open(path, bolt.Options{Keyring: keys})
	if err != nil {
		return nil, err
	}
	defer st.Close()
	tok, err := st.GetTokens(context.Background(), "tenants/t000000/connections/erp")
	if err != nil {
		return nil, err
	}
	// Each commit sample is paired with a raw one on the same file system:
	// a 4 KiB page write and fdatasync, then a 4 KiB meta write and
	// fdatasync, the floor of any B+tree commit that flips a meta page
	// (bbolt's does exactly this). Interleaving makes both see the same disk.
	raw, err := os.OpenFile(filepath.Join(dir, "fsync-baseline"), os.O_CREATE|os.O_RDWR, 0o600)
	if err != nil {
		return nil, err
	}
	defer raw.Close()
	page := make([]byte, 4096)
	var seq, floor []time.Duration
	for i := range commitSamples {
		name := fmt.Sprintf("tenants/t%06d/connections/erp", (i*7919)%n)
		t0 := time.Now()
		if err := st.PutTokens(context.Background(), name, tok); err != nil {
			return nil, err
		}
		seq = append(seq, time.Since(t0))
		t0 = time.Now()
		if err := rawCommit(raw, page, int64(1+i%256)); err != nil {
			return nil, err
		}
		floor = append(floor, time.Since(t0))
	}
	slices.Sort(seq)
	slices.Sort(floor)
	res.commitP50, res.commitP99 = seq[len(seq)/2], seq[len(seq)*99/100]
	res.floorP50, res.floorP99 = floor[len(floor)/2], floor[len(floor)*99/100]
	c0, w0 := st.CommitStats()
	const writers, each = 64, 32
	var wg sync.WaitGroup
	t1 := time.Now()
	for w := range writers {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for j := range each {
				name := fmt.Sprintf("tenants/t%06d/connections/erp", (w*each+j)*31%n)
				st.PutTokens(context.Background(), name, tok)
			}
		}()
	}
	wg.Wait()
	elapsed := time.Since(t1)
	c1, w1 := st.CommitStats()
	res.groupWrites, res.groupCommit = w1-w0, c1-c0
	res.groupThroughput = float64(w1-w0) / elapsed.Seconds()
	return res, nil
}

// memLimits are the soft memory limits (GOMEMLIMIT) of the second and
// third warm starts; the first runs with the Go runtime's defaults.
var memLimits = []string{"256MiB", "320MiB"}

// commitSamples is how many sequential commits (and raw baselines) are
// timed per size: enough that p99 is not one unlucky sample.
const commitSamples = 1000

// rawCommit writes a page at index pg and syncs, then writes page 0 and
// syncs.
func rawCommit(f *os.File, page []byte, pg int64) error {
	if _, err := f.WriteAt(page, pg*int64(len(page))); err != nil {
		return err
	}
	if err := unix.Fdatasync(int(f.Fd())); err != nil {
		return err
	}
	if _, err := f.WriteAt(page, 0); err != nil {
		return err
	}
	return unix.Fdatasync(int(f.Fd()))
}

func medianDur(d []time.Duration) time.Duration {
	s := slices.Clone(d)
	slices.Sort(s)
	return s[len(s)/2]
}

// getEveryToken asks the server at addr for a token of each of the n
// connections populate wrote, from 32 concurrent callers.
func getEveryToken(addr string, n int) error {
	cc, err := grpc.NewClient(addr, grpc.WithTransportCredentials(insecure.NewCredentials()))
	if err != nil {
		return err
	}
	defer cc.Close()
	client := pb.NewTokenBrokerClient(cc)
	next := make(chan int)
	errc := make(chan error, 1)
	var wg sync.WaitGroup
	for range 32 {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for i := range next {
				name := fmt.Sprintf("tenants/t%06d/connections/erp", i)
				r, err := client.GetAccessToken(context.Background(), &pb.GetAccessTokenRequest{Name: name})
				if err == nil && r.GetAccessToken() == "" {
					err = fmt.Errorf("%s: empty token", name)
				}
				if err != nil {
					select {
					case errc <- err:
					default:
					}
				}
			}
		}()
	}
	for i := range n {
		next <- i
	}
	close(next)
	wg.Wait()
	select {
	case err := <-errc:
		return err
	default:
		return nil
	}
}
