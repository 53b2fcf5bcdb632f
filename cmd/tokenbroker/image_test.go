package main

import (
	"archive/tar"
	"bytes"
	"compress/gzip"
	"context"
	"crypto/rand"
	"crypto/tls"
	"crypto/x509"
	"encoding/base64"
	"encoding/json"
	"encoding/pem"
	"fmt"
	"io"
	"net"
	"os"
	"os/exec"
	"path"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	"go.yaml.in/yaml/v3"
	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials"
	"google.golang.org/grpc/credentials/insecure"
	healthpb "google.golang.org/grpc/health/grpc_health_v1"

	pb "tokenbroker/gen/tokenbroker/v1"

	"tokenbroker/server/servertest"
)

// containerfile is what the repository's Containerfile declares.
type containerfile struct {
	user       string
	env        map[string]string
	expose     []string
	volumes    []string
	entrypoint []string
	cmd        []string
}

// readContainerfile reads the instructions the tests compare against: USER,
// ENV, EXPOSE, VOLUME, ENTRYPOINT and CMD (JSON form).
func readContainerfile(t *testing.T) containerfile {
	t.Helper()
	raw, err := os.ReadFile("../../Containerfile")
	if err != nil {
		t.Fatal(err)
	}
	cf := containerfile{env: map[string]string{}}
	var lines []string
	var cont string
	for _, l := range strings.Split(string(raw), "\n") {
		l = strings.TrimSpace(l)
		if strings.HasPrefix(l, "#") || l == "" {
			continue
		}
		if s, ok := strings.CutSuffix(l, "\\"); ok {
			cont += s + " "
			continue
		}
		lines = append(lines, cont+l)
		cont = ""
	}
	for _, l := range lines {
		instr, rest, _ := strings.Cut(l, " ")
		switch strings.ToUpper(instr) {
		case "USER":
			cf.user = rest
		case "ENV":
			for _, kv := range strings.Fields(rest) {
				k, v, _ := strings.Cut(kv, "=")
				cf.env[k] = v
			}
		case "EXPOSE":
			cf.expose = append(cf.expose, strings.Fields(rest)...)
		case "VOLUME":
			cf.volumes = append(cf.volumes, strings.Fields(rest)...)
		case "ENTRYPOINT":
			if err := json.Unmarshal([]byte(rest), &cf.entrypoint); err != nil {
				t.Fatalf("ENTRYPOINT: %v", err)
			}
		case "CMD":
			if err := json.Unmarshal([]byte(rest), &cf.cmd); err != nil {
				t.Fatalf("CMD: %v", err)
			}
		}
	}
	return cf
}

// port returns the port of a TOKENBROKER_*_LISTEN address.
func (cf containerfile) port(t *testing.T, env string) int {
	t.Helper()
	_, p, err := net.SplitHostPort(cf.env[env])
	if err != nil {
		t.Fatalf("%s=%q: %v", env, cf.env[env], err)
	}
	n, _ := strconv.Atoi(p)
	return n
}

// mountDirs are the directories the image reads mounted files from, each
// a separate volume so that each can come from its own Secret or ConfigMap.
func (cf containerfile) mountDirs() []string {
	var dirs []string
	for _, k := range []string{"TOKENBROKER_KEY_FILE", "TOKENBROKER_TLS_CERT", "TOKENBROKER_TLS_KEY", "TOKENBROKER_CLIENT_CA", "TOKENBROKER_POLICY"} {
		if d := path.Dir(cf.env[k]); !slices.Contains(dirs, d) {
			dirs = append(dirs, d)
		}
	}
	return dirs
}

// The Kubernetes manifest runs the image the way its Containerfile expects:
// the user, the data volume, a volume for each mounted directory, the
// probes on the health-only port, and the hardening a platform review asks
// for.
func TestKubernetesManifestMatchesContainerfile(t *testing.T) {
	cf := readContainerfile(t)
	raw, err := os.ReadFile("../../deploy/kubernetes.yaml")
	if err != nil {
		t.Fatal(err)
	}
	type probe struct {
		GRPC      struct{ Port int } `yaml:"grpc"`
		TCPSocket struct{ Port int } `yaml:"tcpSocket"`
	}
	type deployment struct {
		Kind string
		Spec struct {
			Template struct {
				Spec struct {
					AutomountServiceAccountToken *bool `yaml:"automountServiceAccountToken"`
					SecurityContext              struct {
						RunAsNonRoot   bool  `yaml:"runAsNonRoot"`
						RunAsUser      int64 `yaml:"runAsUser"`
						RunAsGroup     int64 `yaml:"runAsGroup"`
						FSGroup        int64 `yaml:"fsGroup"`
						SeccompProfile struct {
							Type string
						} `yaml:"seccompProfile"`
					} `yaml:"securityContext"`
					Containers []struct {
						Image           string
						Env             []struct{ Name, Value string }
						SecurityContext struct {
							AllowPrivilegeEscalation *bool `yaml:"allowPrivilegeEscalation"`
							ReadOnlyRootFilesystem   bool  `yaml:"readOnlyRootFilesystem"`
							RunAsNonRoot             bool  `yaml:"runAsNonRoot"`
							Capabilities             struct{ Drop []string }
						} `yaml:"securityContext"`
						ReadinessProbe probe `yaml:"readinessProbe"`
						LivenessProbe  probe `yaml:"livenessProbe"`
						VolumeMounts   []struct {
							MountPath string `yaml:"mountPath"`
							ReadOnly  bool   `yaml:"readOnly"`
						} `yaml:"volumeMounts"`
					}
				}
			}
		}
	}
	var dep *deployment
	dec := yaml.NewDecoder(bytes.NewReader(raw))
	for {
		var doc deployment
		if err := dec.Decode(&doc); err == io.EOF {
			break
		} else if err != nil {
			t.Fatal(err)
		}
		if doc.Kind == "Deployment" {
			dep = &doc
		}
	}
	if dep == nil {
		t.Fatal("no Deployment in deploy/kubernetes.yaml")
	}
	pod := dep.Spec.Template.Spec
	if len(pod.Containers) != 1 {
		t.Fatalf("want one container, have %d", len(pod.Containers))
	}
	c := pod.Containers[0]
	uid, gid, _ := strings.Cut(cf.user, ":")
	if strconv.FormatInt(pod.SecurityContext.RunAsUser, 10) != uid || strconv.FormatInt(pod.SecurityContext.RunAsGroup, 10) != gid {
		t.Errorf("pod runs as %d:%d, the image as %s", pod.SecurityContext.RunAsUser, pod.SecurityContext.RunAsGroup, cf.user)
	}
	if strconv.FormatInt(pod.SecurityContext.FSGroup, 10) != gid {
		t.Errorf("fsGroup %d: the image's group %s must read the mounted Secrets", pod.SecurityContext.FSGroup, gid)
	}
	if !pod.SecurityContext.RunAsNonRoot || !c.SecurityContext.RunAsNonRoot {
		t.Error("runAsNonRoot is not set on the pod and the container")
	}
	if pod.SecurityContext.SeccompProfile.Type != "RuntimeDefault" {
		t.Errorf("seccompProfile %q", pod.SecurityContext.SeccompProfile.Type)
	}
	if pod.AutomountServiceAccountToken == nil || *pod.AutomountServiceAccountToken {
		t.Error("the pod mounts a service account token it never uses")
	}
	if ape := c.SecurityContext.AllowPrivilegeEscalation; ape == nil || *ape {
		t.Error("allowPrivilegeEscalation is not false")
	}
	if !c.SecurityContext.ReadOnlyRootFilesystem {
		t.Error("root file system is writable")
	}
	if !slices.Equal(c.SecurityContext.Capabilities.Drop, []string{"ALL"}) {
		t.Errorf("capabilities dropped: %v, want ALL", c.SecurityContext.Capabilities.Drop)
	}
	name, tag, ok := strings.Cut(path.Base(c.Image), ":")
	if !ok || name != "tokenbroker" || tag == "" || tag == "latest" {
		t.Errorf("image %q: want .../tokenbroker:<version>", c.Image)
	}
	health := cf.port(t, "TOKENBROKER_HEALTH_LISTEN")
	if !slices.Contains(cf.expose, fmt.Sprintf("%d/tcp", health)) {
		t.Errorf("the image does not expose its health port %d: %v", health, cf.expose)
	}
	// Readiness follows the gRPC health; liveness must not (a restart
	// after the data file was deleted would start from an empty file), so
	// it only checks that the port answers.
	if c.ReadinessProbe.GRPC.Port != health || c.LivenessProbe.TCPSocket.Port != health || c.LivenessProbe.GRPC.Port != 0 {
		t.Errorf("readiness gRPC probe on port %d, liveness TCP probe on %d (gRPC %d); the image's health-only port is %d",
			c.ReadinessProbe.GRPC.Port, c.LivenessProbe.TCPSocket.Port, c.LivenessProbe.GRPC.Port, health)
	}
	mounts := map[string]bool{}
	for _, m := range c.VolumeMounts {
		mounts[m.MountPath] = m.ReadOnly
	}
	for _, v := range cf.volumes {
		if ro, ok := mounts[v]; !ok || ro {
			t.Errorf("image volume %s is not mounted writable", v)
		}
	}
	for _, d := range cf.mountDirs() {
		if ro, ok := mounts[d]; !ok || !ro {
			t.Errorf("the image reads files from %s: mount it read-only", d)
		}
	}
	// Settings the image makes are not overridden with other values.
	for _, e := range c.Env {
		if v, ok := cf.env[e.Name]; ok && v != e.Value {
			t.Errorf("%s=%s in the manifest, %s in the image", e.Name, e.Value, v)
		}
	}
}

// ociImage is an OCI image archive, read: its config and every layer's
// files.
type ociImage struct {
	ref    string
	config struct {
		User         string
		Env          []string
		ExposedPorts map[string]struct{}
		Volumes      map[string]struct{}
		Entrypoint   []string
		Cmd          []string
		Labels       map[string]string
	}
	files map[string][]byte // path in the image -> content, across layers
	modes map[string]string // path -> mode and owner, as uid:gid mode
}

func readOCIArchive(t *testing.T, archive string) *ociImage {
	t.Helper()
	f, err := os.Open(archive)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	blobs := map[string][]byte{}
	tr := tar.NewReader(f)
	for {
		h, err := tr.Next()
		if err == io.EOF {
			break
		}
		if err != nil {
			t.Fatal(err)
		}
		b, err := io.ReadAll(tr)
		if err != nil {
			t.Fatal(err)
		}
		blobs[path.Clean(h.Name)] = b
	}
	blob := func(digest string) []byte {
		b, ok := blobs[path.Join("blobs", strings.Replace(digest, ":", "/", 1))]
		if !ok {
			t.Fatalf("archive lacks blob %s", digest)
		}
		return b
	}
	var index struct {
		Manifests []struct {
			Digest      string
			Annotations map[string]string
		}
	}
	if err := json.Unmarshal(blobs["index.json"], &index); err != nil || len(index.Manifests) != 1 {
		t.Fatalf("index.json: %v, %d manifests", err, len(index.Manifests))
	}
	var manifest struct {
		Config struct{ Digest string }
		Layers []struct{ MediaType, Digest string }
	}
	if err := json.Unmarshal(blob(index.Manifests[0].Digest), &manifest); err != nil {
		t.Fatal(err)
	}
	img := &ociImage{ref: index.Manifests[0].Annotations["org.opencontainers.image.ref.name"], files: map[string][]byte{}, modes: map[string]string{}}
	var cfg struct {
		Config json.RawMessage
	}
	if err := json.Unmarshal(blob(manifest.Config.Digest), &cfg); err != nil {
		t.Fatal(err)
	}
	if err := json.Unmarshal(cfg.Config, &img.config); err != nil {
		t.Fatal(err)
	}
	for _, l := range manifest.Layers {
		var r io.Reader = bytes.NewReader(blob(l.Digest))
		if strings.HasSuffix(l.MediaType, "+gzip") {
			zr, err := gzip.NewReader(r)
			if err != nil {
				t.Fatal(err)
			}
			r = zr
		}
		lr := tar.NewReader(r)
		for {
			h, err := lr.Next()
			if err == io.EOF {
				break
			}
			if err != nil {
				t.Fatalf("layer %s: %v", l.Digest, err)
			}
			b, err := io.ReadAll(lr)
			if err != nil {
				t.Fatal(err)
			}
			name := "/" + strings.TrimSuffix(path.Clean(h.Name), "/")
			img.files[name] = b
			img.modes[name] = fmt.Sprintf("%d:%d %v", h.Uid, h.Gid, h.FileInfo().Mode())
		}
	}
	return img
}

func (img *ociImage) env(name string) string {
	for _, e := range img.config.Env {
		if v, ok := strings.CutPrefix(e, name+"="); ok {
			return v
		}
	}
	return ""
}

// buildah runs the image with Debian's buildah: vfs storage of the test's
// own, chroot isolation (no daemon, no namespaces beyond what root has).
type buildah struct {
	t     *testing.T
	store []string
	ctr   string
}

func newBuildah(t *testing.T, archive string) *buildah {
	t.Helper()
	if _, err := exec.LookPath("buildah"); err != nil {
		t.Fatal("buildah is not installed (.ci/image installs it)")
	}
	dir := t.TempDir()
	b := &buildah{t: t, store: []string{"--storage-driver", "vfs", "--root", filepath.Join(dir, "root"), "--runroot", filepath.Join(dir, "run")}}
	out, err := exec.Command("buildah", append(b.store, "from", "--quiet", "--pull-never", "oci-archive:"+archive)...).Output()
	if err != nil {
		t.Fatalf("buildah from: %v", err)
	}
	b.ctr = strings.TrimSpace(string(out))
	t.Cleanup(func() { exec.Command("buildah", append(b.store, "rm", b.ctr)...).Run() })
	return b
}

// command runs argv in the container as the image's user, with binds
// ("host:container:ro").
func (b *buildah) command(binds []string, argv ...string) *exec.Cmd {
	args := append(slices.Clone(b.store), "run", "--isolation", "chroot")
	for _, v := range binds {
		args = append(args, "-v", v)
	}
	args = append(args, b.ctr, "--")
	cmd := exec.Command("buildah", append(args, argv...)...)
	// buildah's chroot runtime and the binary share buildah's process
	// group: killing the group leaves nothing behind.
	cmd.SysProcAttr = &syscall.SysProcAttr{Setpgid: true}
	return cmd
}

// start runs argv in the container and waits until it serves or exits.
func (b *buildah) start(binds []string, argv ...string) *proc {
	b.t.Helper()
	p := startCmd(b.t, b.command(binds, argv...))
	b.t.Cleanup(func() { syscall.Kill(-p.cmd.Process.Pid, syscall.SIGKILL) })
	return p
}

// stop sends SIGTERM to the binary itself (not to buildah, which would
// kill it) and waits for it to exit.
func (b *buildah) stop(p *proc) {
	b.t.Helper()
	pgid := p.cmd.Process.Pid
	entries, _ := os.ReadDir("/proc")
	signalled := false
	for _, e := range entries {
		pid, err := strconv.Atoi(e.Name())
		if err != nil {
			continue
		}
		comm, _ := os.ReadFile(filepath.Join("/proc", e.Name(), "comm"))
		if g, err := syscall.Getpgid(pid); err == nil && g == pgid && strings.TrimSpace(string(comm)) == "tokenbroker" {
			syscall.Kill(pid, syscall.SIGTERM)
			signalled = true
		}
	}
	if !signalled {
		b.t.Fatalf("no tokenbroker process under buildah %d", pgid)
	}
	select {
	case <-p.exited:
	case <-time.After(30 * time.Second):
		b.t.Fatalf("did not stop on SIGTERM: %s", p.out.String())
	}
}

// freePort returns a loopback port nothing listens on now.
func freePort(t *testing.T) int {
	t.Helper()
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer l.Close()
	return l.Addr().(*net.TCPAddr).Port
}

// writeMounted writes a file as Kubernetes mounts a Secret for a pod
// with an fsGroup: owned by root, group gid, mode 0440, in a directory the
// group may enter.
func writeMounted(t *testing.T, dir, name string, data []byte, gid int) {
	t.Helper()
	os.MkdirAll(dir, 0o755)
	p := filepath.Join(dir, name)
	if err := os.WriteFile(p, data, 0o440); err != nil {
		t.Fatal(err)
	}
	if err := os.Chown(p, 0, gid); err != nil {
		t.Fatal(err)
	}
	os.Chmod(p, 0o440)
}

// TestImage runs the OCI archive that deploy/image/build.sh wrote, as
// .ci/image does: TOKENBROKER_IMAGE_ARCHIVE names it, and
// TOKENBROKER_IMAGE_DECOYS names files (comma-separated) whose contents
// must not be in any layer. The binary inside starts from the image's own
// entrypoint, user and settings with the key, certificates and policy
// mounted; answers health on the health-only port; refuses plaintext
// beyond loopback; serves a token from the stand-in over mTLS; keeps it in
// the /data volume across a restart; and no test secret, nor any file
// beyond the image's own, is in a layer.
func TestImage(t *testing.T) {
	archive := os.Getenv("TOKENBROKER_IMAGE_ARCHIVE")
	if archive == "" {
		t.Skip("TOKENBROKER_IMAGE_ARCHIVE is not set; .ci/image builds the image and runs this test")
	}
	cf := readContainerfile(t)
	img := readOCIArchive(t, archive)

	t.Run("config", func(t *testing.T) {
		uid, _, _ := strings.Cut(img.config.User, ":")
		if n, err := strconv.Atoi(uid); err != nil || n == 0 {
			t.Errorf("user %q: want a numeric non-root uid", img.config.User)
		}
		if img.config.User != cf.user {
			t.Errorf("user %q, Containerfile says %q", img.config.User, cf.user)
		}
		for _, p := range cf.expose {
			if _, ok := img.config.ExposedPorts[p]; !ok {
				t.Errorf("port %s not exposed: %v", p, img.config.ExposedPorts)
			}
		}
		if _, ok := img.config.Volumes["/data"]; !ok || img.env("TOKENBROKER_DATA_DIR") != "/data" {
			t.Errorf("volumes %v, data dir %q", img.config.Volumes, img.env("TOKENBROKER_DATA_DIR"))
		}
		if m := img.modes["/data"]; m != cf.user+" drwx------" {
			t.Errorf("/data is %q, want owned by %s, mode 0700", m, cf.user)
		}
		for k, v := range cf.env {
			if img.env(k) != v {
				t.Errorf("%s=%q, Containerfile says %q", k, img.env(k), v)
			}
		}
		want := os.Getenv("TOKENBROKER_IMAGE_VERSION")
		if want != "" && (img.config.Labels["org.opencontainers.image.version"] != want || img.ref != "tokenbroker:"+want) {
			t.Errorf("version label %q, ref %q, want %s", img.config.Labels["org.opencontainers.image.version"], img.ref, want)
		}
	})
	t.Run("layers hold only the image's files", func(t *testing.T) {
		allowed := []string{"/data", "/etc", "/etc/passwd", "/etc/group", "/etc/ssl", "/etc/ssl/certs",
			"/etc/ssl/certs/ca-certificates.crt", "/tokenbroker"}
		for name := range img.files {
			if !slices.Contains(allowed, name) {
				t.Errorf("unexpected file in a layer: %s", name)
			}
		}
		if !strings.Contains(string(img.files["/etc/passwd"]), ":"+cf.user+":") {
			t.Errorf("/etc/passwd has no entry for %s: %q", cf.user, img.files["/etc/passwd"])
		}
		if !bytes.Contains(img.files["/etc/ssl/certs/ca-certificates.crt"], []byte("BEGIN CERTIFICATE")) {
			t.Error("no CA certificates")
		}
	})

	s, upstream := idp(t)
	b := newBuildah(t, archive)
	_, gidText, _ := strings.Cut(cf.user, ":")
	gid, _ := strconv.Atoi(gidText)

	// The mounted files, as Kubernetes mounts Secrets and ConfigMaps.
	host := t.TempDir()
	key := make([]byte, 32)
	rand.Read(key)
	keyText := base64.StdEncoding.EncodeToString(key)
	ca := servertest.NewCA(t, "image test CA")
	serverCert := ca.Issue(t, servertest.Leaf{CN: "tokenbroker", IPs: []net.IP{net.ParseIP("127.0.0.1")}, Server: true})
	keyDER, err := x509.MarshalPKCS8PrivateKey(serverCert.PrivateKey)
	if err != nil {
		t.Fatal(err)
	}
	keyPEM := pem.EncodeToMemory(&pem.Block{Type: "PRIVATE KEY", Bytes: keyDER})
	files := map[string][]byte{
		cf.env["TOKENBROKER_KEY_FILE"]:  []byte(keyText + "\n"),
		cf.env["TOKENBROKER_TLS_CERT"]:  pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: serverCert.Certificate[0]}),
		cf.env["TOKENBROKER_TLS_KEY"]:   keyPEM,
		cf.env["TOKENBROKER_CLIENT_CA"]: ca.PEM,
		cf.env["TOKENBROKER_POLICY"]: []byte(`rules:
  - identities: ["spiffe://corp.test/ops/root"]
    role: operator
    tenants: ["*"]
  - identities: ["spiffe://corp.test/svc/orders"]
    role: consumer
    connections: ["tenants/acme/connections/erp"]
`),
	}
	var binds []string
	for _, d := range cf.mountDirs() {
		binds = append(binds, filepath.Join(host, d)+":"+d+":ro")
	}
	for p, data := range files {
		writeMounted(t, filepath.Join(host, path.Dir(p)), path.Base(p), data, gid)
	}

	// The image's own command, on free loopback ports (the image's
	// 0.0.0.0 would be the machine's network here: buildah's chroot
	// isolation shares it). The stand-in is plain http on loopback.
	listen, healthPort := freePort(t), freePort(t)
	argv := append(slices.Clone(img.config.Entrypoint), img.config.Cmd...)
	argv = append(argv, "--listen", fmt.Sprintf("127.0.0.1:%d", listen),
		"--health-listen", fmt.Sprintf("127.0.0.1:%d", healthPort), "--allow-insecure-upstream")
	p := b.start(binds, argv...)
	if p.addr == "" {
		t.Fatalf("the image's binary did not serve: %s", p.out.String())
	}
	if !strings.Contains(p.out.String(), "(mTLS)") {
		t.Errorf("not serving mTLS: %s", p.out.String())
	}

	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	t.Run("health on the health-only port", func(t *testing.T) {
		cc, err := grpc.NewClient(fmt.Sprintf("127.0.0.1:%d", healthPort), grpc.WithTransportCredentials(insecure.NewCredentials()))
		if err != nil {
			t.Fatal(err)
		}
		defer cc.Close()
		resp, err := healthpb.NewHealthClient(cc).Check(ctx, &healthpb.HealthCheckRequest{})
		if err != nil || resp.GetStatus() != healthpb.HealthCheckResponse_SERVING {
			t.Errorf("health: %v %v", resp, err)
		}
		// The health-only port serves nothing else.
		_, err = pb.NewTokenBrokerClient(cc).ListConnections(ctx, &pb.ListConnectionsRequest{Parent: "tenants/-"})
		if err == nil {
			t.Error("the health-only port answers TokenBroker calls")
		}
	})
	t.Run("plaintext refused on the TLS port", func(t *testing.T) {
		cc, err := grpc.NewClient(p.addr, grpc.WithTransportCredentials(insecure.NewCredentials()))
		if err != nil {
			t.Fatal(err)
		}
		defer cc.Close()
		if _, err := pb.NewTokenBrokerClient(cc).GetAccessToken(ctx, &pb.GetAccessTokenRequest{Name: connName}); err == nil {
			t.Error("a plaintext call was answered")
		}
	})
	dial := func(uri string) pb.TokenBrokerClient {
		pool := x509.NewCertPool()
		pool.AddCert(ca.Cert)
		cc, err := grpc.NewClient(p.addr, grpc.WithTransportCredentials(credentials.NewTLS(&tls.Config{
			RootCAs: pool, MinVersion: tls.VersionTLS12, Certificates: []tls.Certificate{ca.Issue(t, servertest.Leaf{URI: uri})},
		})))
		if err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { cc.Close() })
		return pb.NewTokenBrokerClient(cc)
	}
	createConnection(t, dial("spiffe://corp.test/ops/root"), "tenants/acme", upstream)
	tok, err := dial("spiffe://corp.test/svc/orders").GetAccessToken(ctx, &pb.GetAccessTokenRequest{Name: connName})
	if err != nil {
		t.Fatalf("token: %v\n%s", err, p.out.String())
	}
	if !s.AccessTokenValid(tok.GetAccessToken()) {
		t.Error("the token served is not live at the stand-in")
	}

	t.Run("SIGTERM stops it; /data keeps the connection", func(t *testing.T) {
		b.stop(p)
		if p.err != nil || !strings.Contains(p.out.String(), `"msg":"stopped"`) {
			t.Fatalf("exit %v after SIGTERM: %s", p.err, p.out.String())
		}
		again := b.start(binds, argv...)
		if again.addr == "" {
			t.Fatalf("restart: %s", again.out.String())
		}
		p = again
		got, err := dial("spiffe://corp.test/svc/orders").GetAccessToken(ctx, &pb.GetAccessTokenRequest{Name: connName})
		if err != nil || got.GetAccessToken() != tok.GetAccessToken() {
			t.Errorf("after restart: %v (same token: %v)", err, got.GetAccessToken() == tok.GetAccessToken())
		}
		if n := s.Counts().PasswordGrants; n != 1 {
			t.Errorf("%d password grants, want 1: the restart lost the stored tokens", n)
		}
	})
	t.Run("plaintext beyond loopback refused", func(t *testing.T) {
		// The image's own listen address (every interface), TLS taken away.
		q := startCmd(t, b.command(binds, append(slices.Clone(argv[:2]), "--tls-cert=", "--tls-key=", "--client-ca=", "--policy=")...))
		<-q.exited
		want := "refusing to listen on " + img.env("TOKENBROKER_LISTEN") + " without TLS"
		if q.err == nil || !strings.Contains(q.out.String(), want) {
			t.Errorf("exit %v, output %q, want %q", q.err, q.out.String(), want)
		}
	})
	t.Run("nothing mounted: refuses to start", func(t *testing.T) {
		q := startCmd(t, b.command(nil, argv...))
		<-q.exited
		if q.err == nil || !strings.Contains(q.out.String(), cf.env["TOKENBROKER_KEY_FILE"]) {
			t.Errorf("exit %v, output %q, want a failure naming the key file", q.err, q.out.String())
		}
	})
	t.Run("version", func(t *testing.T) {
		out, err := b.command(nil, "/tokenbroker", "version").CombinedOutput()
		want := "tokenbroker " + img.config.Labels["org.opencontainers.image.version"] + " commit " + img.config.Labels["org.opencontainers.image.revision"] + " go"
		if err != nil || !strings.HasPrefix(string(out), want) {
			t.Errorf("%v %q, want it to start %q", err, out, want)
		}
	})
	b.stop(p)

	// The data key, TLS key, credentials and tokens below are made after
	// the image was built, so finding one would mean a layer was taken from
	// a running container. What the build itself could leak is what lies
	// in the checkout it runs from: .ci/image plants a decoy key there
	// (TOKENBROKER_IMAGE_DECOYS), and that is the check a careless build
	// script would fail.
	t.Run("no secret in any layer", func(t *testing.T) {
		secrets := map[string][]byte{
			"data key (base64)": []byte(keyText), "data key": key,
			"TLS private key (PEM)": keyPEM[28:80], "TLS private key (DER)": keyDER,
			"client secret": []byte(clientSecret), "password": []byte(password),
		}
		for i, tok := range s.Issued() {
			secrets[fmt.Sprintf("issued token %d", i)] = []byte(tok)
		}
		for _, f := range strings.Split(os.Getenv("TOKENBROKER_IMAGE_DECOYS"), ",") {
			if f == "" {
				continue
			}
			b, err := os.ReadFile(f)
			if err != nil || len(bytes.TrimSpace(b)) < 16 {
				t.Fatalf("decoy %s: %v (%d bytes)", f, err, len(b))
			}
			secrets["decoy "+f] = bytes.TrimSpace(b)
		}
		if len(s.Issued()) == 0 {
			t.Fatal("no tokens issued to look for")
		}
		for name, content := range img.files {
			for what, secret := range secrets {
				if bytes.Contains(content, secret) {
					t.Errorf("%s is in the image's %s", what, name)
				}
			}
		}
	})
}
