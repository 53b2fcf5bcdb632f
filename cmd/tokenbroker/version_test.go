package main

import (
	"os/exec"
	"path/filepath"
	"regexp"
	"runtime"
	"strings"
	"testing"
)

// The release build's stamp is what "version" and "--version" print.
func TestVersionStampedByTheBuild(t *testing.T) {
	bin := filepath.Join(t.TempDir(), "tokenbroker")
	ldflags := "-X main.version=v9.8.7-test -X main.commit=0123456789abcdef0123456789abcdef01234567"
	if out, err := exec.Command("go", "build", "-trimpath", "-ldflags", ldflags, "-o", bin, ".").CombinedOutput(); err != nil {
		t.Fatalf("build: %v\n%s", err, out)
	}
	want := "tokenbroker v9.8.7-test commit 0123456789abcdef0123456789abcdef01234567 " + runtime.Version() + " " + runtime.GOOS + "/" + runtime.GOARCH + "\n"
	for _, arg := range []string{"version", "--version", "-version"} {
		out, err := exec.Command(bin, arg).CombinedOutput()
		if err != nil || string(out) != want {
			t.Errorf("%s: %v %q, want %q", arg, err, out, want)
		}
	}
}

// Without a stamp, the line says what the Go toolchain recorded: the VCS
// revision when it recorded one, and the Go version always.
func TestVersionFallsBackToBuildInfo(t *testing.T) {
	out, err := exec.Command(binary, "version").CombinedOutput()
	if err != nil {
		t.Fatalf("%v %q", err, out)
	}
	line := string(out)
	if !strings.HasPrefix(line, "tokenbroker ") || !strings.HasSuffix(line, " "+runtime.Version()+" "+runtime.GOOS+"/"+runtime.GOARCH+"\n") {
		t.Errorf("version line %q", line)
	}
	info, err := exec.Command("go", "version", "-m", binary).Output()
	if err != nil {
		t.Fatal(err)
	}
	if m := regexp.MustCompile(`vcs\.revision=([0-9a-f]+)`).FindSubmatch(info); m != nil {
		if !strings.Contains(line, " commit "+string(m[1])) {
			t.Errorf("version line %q lacks the recorded revision %s", line, m[1])
		}
	} else if !strings.Contains(line, " commit unknown ") {
		t.Errorf("no revision recorded, but the line %q names one", line)
	}
}
