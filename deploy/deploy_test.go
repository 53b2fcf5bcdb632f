// Package deploy holds the files that run tokenbroker elsewhere: the
// Kubernetes manifest, the systemd unit, the alert rules. Its tests keep
// those files consistent with each other and with the code.
package deploy

import (
	"os"
	"reflect"
	"regexp"
	"sort"
	"testing"

	"go.yaml.in/yaml/v3"
)

func readYAML(t *testing.T, path string, into any) {
	t.Helper()
	b, err := os.ReadFile(path)
	if err != nil {
		t.Fatal(err)
	}
	if err := yaml.Unmarshal(b, into); err != nil {
		t.Fatalf("%s: %v", path, err)
	}
}

// TestPrometheusRuleMatchesRulesFile: the Kubernetes PrometheusRule carries
// exactly the groups that promtool tests in the plain rules file.
func TestPrometheusRuleMatchesRulesFile(t *testing.T) {
	var rules struct {
		Groups []any `yaml:"groups"`
	}
	var pr struct {
		Kind string `yaml:"kind"`
		Spec struct {
			Groups []any `yaml:"groups"`
		} `yaml:"spec"`
	}
	readYAML(t, "alerts/tokenbroker.rules.yaml", &rules)
	readYAML(t, "prometheusrule.yaml", &pr)
	if pr.Kind != "PrometheusRule" {
		t.Errorf("prometheusrule.yaml kind = %q, want PrometheusRule", pr.Kind)
	}
	if len(rules.Groups) == 0 {
		t.Fatal("the rules file has no groups")
	}
	if !reflect.DeepEqual(rules.Groups, pr.Spec.Groups) {
		t.Error("deploy/prometheusrule.yaml's spec.groups differ from deploy/alerts/tokenbroker.rules.yaml's groups; edit both together")
	}
}

// TestRulesUseMetricsTheServerDefines: every tokenbroker_ metric an alert
// reads is one server/metrics.go defines, so a renamed metric cannot leave
// an alert that never fires.
func TestRulesUseMetricsTheServerDefines(t *testing.T) {
	rules, err := os.ReadFile("alerts/tokenbroker.rules.yaml")
	if err != nil {
		t.Fatal(err)
	}
	src, err := os.ReadFile("../server/metrics.go")
	if err != nil {
		t.Fatal(err)
	}
	name := regexp.MustCompile(`tokenbroker_[a-z_]+[a-z]`)
	defined := map[string]bool{}
	for _, n := range regexp.MustCompile(`"(tokenbroker_[a-z_]+)"`).FindAllSubmatch(src, -1) {
		defined[string(n[1])] = true
	}
	used := map[string]bool{}
	for _, n := range name.FindAll(rules, -1) {
		used[string(n)] = true
	}
	if len(used) == 0 {
		t.Fatal("the rules use no tokenbroker_ metric")
	}
	var missing []string
	for n := range used {
		if !defined[n] {
			missing = append(missing, n)
		}
	}
	sort.Strings(missing)
	if len(missing) > 0 {
		t.Errorf("alert rules read metrics that server/metrics.go does not define: %v", missing)
	}
}
