package main

import (
	"fmt"
	"image"
	"image/color"
	"image/png"
	"math"
	"os"
	"time"

	"golang.org/x/image/font"
	"golang.org/x/image/font/basicfont"
	"golang.org/x/image/math/fixed"
)

// series is one line of the plot.
type series struct {
	label string
	col   color.RGBA
	dash  bool
	ys    []time.Duration
}

// plotLatency draws latency (µs, linear) against concurrency (log scale)
// for each series, as a PNG.
func plotLatency(path string, concs []int, lines []series) error {
	const w, h = 960, 600
	const left, right, top, bottom = 90, 40, 50, 70
	img := image.NewRGBA(image.Rect(0, 0, w, h))
	fill(img, img.Bounds(), color.RGBA{255, 255, 255, 255})
	var ymax float64
	for _, s := range lines {
		for _, y := range s.ys {
			ymax = math.Max(ymax, float64(y.Microseconds()))
		}
	}
	ymax = niceCeil(ymax * 1.1)
	xs := func(i int) int {
		lo, hi := math.Log2(float64(concs[0])), math.Log2(float64(concs[len(concs)-1]))
		return left + int((math.Log2(float64(concs[i]))-lo)/(hi-lo)*float64(w-left-right))
	}
	ys := func(v float64) int { return h - bottom - int(v/ymax*float64(h-top-bottom)) }
	grey := color.RGBA{200, 200, 200, 255}
	black := color.RGBA{0, 0, 0, 255}
	for k := 0; k <= 5; k++ {
		v := ymax * float64(k) / 5
		line(img, left, ys(v), w-right, ys(v), grey, false)
		label(img, 8, ys(v)+4, fmt.Sprintf("%8.0f", v), black)
	}
	for i, c := range concs {
		line(img, xs(i), top, xs(i), h-bottom, grey, false)
		label(img, xs(i)-8, h-bottom+20, fmt.Sprint(c), black)
	}
	line(img, left, h-bottom, w-right, h-bottom, black, false)
	line(img, left, top, left, h-bottom, black, false)
	label(img, w/2-110, h-20, "concurrent callers (log scale)", black)
	label(img, 8, top-20, "latency (microseconds)", black)
	label(img, w/2-200, 25, "Cached GetAccessToken vs no-op RPC, same server stack (plaintext and mTLS)", black)
	for li, s := range lines {
		for i := 1; i < len(s.ys); i++ {
			x0, y0 := xs(i-1), ys(float64(s.ys[i-1].Microseconds()))
			x1, y1 := xs(i), ys(float64(s.ys[i].Microseconds()))
			for d := -1; d <= 1; d++ {
				line(img, x0, y0+d, x1, y1+d, s.col, s.dash)
			}
		}
		for i := range s.ys {
			fill(img, image.Rect(xs(i)-3, ys(float64(s.ys[i].Microseconds()))-3, xs(i)+4, ys(float64(s.ys[i].Microseconds()))+4), s.col)
		}
		ly := top + 10 + li*18
		line(img, left+20, ly, left+50, ly, s.col, s.dash)
		line(img, left+20, ly+1, left+50, ly+1, s.col, s.dash)
		label(img, left+58, ly+5, s.label, black)
	}
	f, err := os.Create(path)
	if err != nil {
		return err
	}
	defer f.Close()
	return png.Encode(f, img)
}

func niceCeil(v float64) float64 {
	if v <= 0 {
		return 1
	}
	mag := math.Pow(10, math.Floor(math.Log10(v)))
	for _, m := range []float64{1, 2, 2.5, 5, 10} {
		if m*mag >= v {
			return m * mag
		}
	}
	return 10 * mag
}

func fill(img *image.RGBA, r image.Rectangle, c color.RGBA) {
	r = r.Intersect(img.Bounds())
	for y := r.Min.Y; y < r.Max.Y; y++ {
		for x := r.Min.X; x < r.Max.X; x++ {
			img.SetRGBA(x, y, c)
		}
	}
}

// line draws with Bresenham's algorithm; dashed lines skip every other 6 px.
func line(img *image.RGBA, x0, y0, x1, y1 int, c color.RGBA, dashed bool) {
	dx, dy := abs(x1-x0), -abs(y1-y0)
	sx, sy := sign(x1-x0), sign(y1-y0)
	e := dx + dy
	for n := 0; ; n++ {
		if !dashed || (n/6)%2 == 0 {
			if (image.Point{x0, y0}).In(img.Bounds()) {
				img.SetRGBA(x0, y0, c)
			}
		}
		if x0 == x1 && y0 == y1 {
			return
		}
		e2 := 2 * e
		if e2 >= dy {
			e += dy
			x0 += sx
		}
		if e2 <= dx {
			e += dx
			y0 += sy
		}
	}
}

func label(img *image.RGBA, x, y int, s string, c color.RGBA) {
	d := &font.Drawer{Dst: img, Src: image.NewUniform(c), Face: basicfont.Face7x13, Dot: fixed.P(x, y)}
	d.DrawString(s)
}

func abs(v int) int {
	if v < 0 {
		return -v
	}
	return v
}

func sign(v int) int {
	switch {
	case v > 0:
		return 1
	case v < 0:
		return -1
	}
	return 0
}
