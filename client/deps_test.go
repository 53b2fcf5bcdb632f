package client_test

import (
	"os/exec"
	"strings"
	"testing"
)

// TestImportsNothingOfTheBrokersInside keeps the package light for the
// services that import it: no storage engines, no metrics, no broker.
func TestImportsNothingOfTheBrokersInside(t *testing.T) {
	out, err := exec.Command("go", "list", "-deps", "tokenbroker/client").Output()
	if err != nil {
		t.Fatalf("go list -deps: %v", err)
	}
	deps := strings.Fields(string(out))
	if len(deps) < 10 || !strings.Contains(string(out), "golang.org/x/oauth2") {
		t.Fatalf("go list -deps gave %d packages, without x/oauth2: the check would prove nothing", len(deps))
	}
	forbidden := []string{"go.etcd.io/", "github.com/prometheus/", "tokenbroker/broker", "tokenbroker/storage", "tokenbroker/server", "tokenbroker/cmd"}
	for _, d := range deps {
		for _, f := range forbidden {
			if strings.HasPrefix(d, f) {
				t.Errorf("tokenbroker/client depends on %s", d)
			}
		}
	}
}
