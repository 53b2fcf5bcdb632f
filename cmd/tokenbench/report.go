package main

import (
	_ "embed"
	"fmt"
	"io"
	"math"
	"text/template"
)

//go:embed report.md.tmpl
var reportTemplate string

var report = template.Must(template.New("report").Funcs(template.FuncMap{
	"num":     num,
	"ratio":   func(v float64) string { return fmt.Sprintf("%.3f", v) },
	"div":     func(a, b float64) float64 { return a / b },
	"sub":     func(a, b float64) float64 { return a - b },
	"missed":  missed,
	"verdict": func(ok bool) string { return map[bool]string{true: "met", false: "**missed**"}[ok] },
}).Parse(reportTemplate))

// render writes the report of r as markdown.
func render(w io.Writer, r *Results) error { return report.Execute(w, r) }

// num formats a measurement: whole numbers as they are, others with the
// precision their size warrants.
func num(v float64) string {
	switch a := math.Abs(v); {
	case v == math.Trunc(v) && a < 1e12, a >= 100:
		return fmt.Sprintf("%.0f", v)
	case a >= 1:
		return fmt.Sprintf("%.1f", v)
	default:
		return fmt.Sprintf("%.3f", v)
	}
}
