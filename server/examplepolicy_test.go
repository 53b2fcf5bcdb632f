package server_test

import (
	"os"
	"testing"

	"tokenbroker/server"
)

// TestShippedExamplePolicyParses keeps deploy/policy.example.yaml valid.
func TestShippedExamplePolicyParses(t *testing.T) {
	b, err := os.ReadFile("../deploy/policy.example.yaml")
	if err != nil {
		t.Fatal(err)
	}
	if _, err := server.ParsePolicy(b); err != nil {
		t.Fatal(err)
	}
}
