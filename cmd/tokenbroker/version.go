package main

import (
	"runtime"
	"runtime/debug"
	"strings"
)

// version and commit are stamped by the release build (deploy/image/build.sh):
//
//	go build -ldflags "-X main.version=v1.2.3 -X main.commit=<git sha>"
//
// A plain go build leaves them empty; the version line then falls back to
// what the Go toolchain recorded (module version, VCS revision).
var (
	version string
	commit  string
)

// versionLine says what this binary was built from, in one line:
// "tokenbroker <version> commit <revision>[ (modified)] <go version> <os>/<arch>".
func versionLine() string {
	v, rev, modified := version, commit, false
	if bi, ok := debug.ReadBuildInfo(); ok {
		if v == "" {
			v = bi.Main.Version
		}
		for _, s := range bi.Settings {
			switch {
			case s.Key == "vcs.revision" && rev == "":
				rev = s.Value
			case s.Key == "vcs.modified" && commit == "":
				modified = s.Value == "true"
			}
		}
	}
	var b strings.Builder
	b.WriteString("tokenbroker " + orUnknown(v) + " commit " + orUnknown(rev))
	if modified {
		b.WriteString(" (modified)")
	}
	b.WriteString(" " + runtime.Version() + " " + runtime.GOOS + "/" + runtime.GOARCH)
	return b.String()
}

func orUnknown(s string) string {
	if s == "" || s == "(devel)" {
		return "unknown"
	}
	return s
}

// wantsVersion reports whether the command line asks for the version
// instead of serving: "version", "--version" or "-version".
func wantsVersion(args []string) bool {
	if len(args) == 0 {
		return false
	}
	switch args[0] {
	case "version", "--version", "-version":
		return true
	}
	return false
}
