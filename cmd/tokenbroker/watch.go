package main

import (
	"context"
	"os"
	"strconv"
	"time"
)

// watchFiles calls fn whenever one of the files changes (size or
// modification time), checking every interval until ctx ends.
func watchFiles(ctx context.Context, interval time.Duration, paths []string, fn func()) {
	stamp := func() []string {
		var out []string
		for _, p := range paths {
			if info, err := os.Stat(p); err == nil {
				out = append(out, info.ModTime().String()+"/"+strconv.FormatInt(info.Size(), 10))
			} else {
				out = append(out, "missing")
			}
		}
		return out
	}
	last := stamp()
	t := time.NewTicker(interval)
	defer t.Stop()
	for {
		select {
		case <-ctx.Done():
			return
		case <-t.C:
			now := stamp()
			for i := range now {
				if now[i] != last[i] {
					last = now
					fn()
					break
				}
			}
		}
	}
}
