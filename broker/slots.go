package broker

import (
	"context"
	"net/url"
	"sync"
)

// slots caps concurrent upstream calls twice: across all connections, and
// per upstream host. The per-host share keeps one Acumatica server that
// stops answering from holding every global slot until its requests time
// out, which would starve the connections of healthy servers.
type slots struct {
	global  chan struct{}
	perHost int

	mu    sync.Mutex
	hosts map[string]*hostSlots // only hosts with calls in flight or waiting
}

// hostSlots is one host's share; users counts holders and waiters so the
// entry goes away when the host is quiet.
type hostSlots struct {
	ch    chan struct{}
	users int
}

func newSlots(global, perHost int) *slots {
	return &slots{global: make(chan struct{}, global), perHost: perHost, hosts: map[string]*hostSlots{}}
}

// hostKey is the origin of an instance URL: instances behind one web server
// share its fate.
func hostKey(instanceURL string) string {
	u, err := url.Parse(instanceURL)
	if err != nil || u.Host == "" {
		return instanceURL
	}
	return u.Scheme + "://" + u.Host
}

// acquire takes a slot of instanceURL's host, then a global one, so that a
// call waiting on a busy host holds no global slot. The returned func gives
// both back.
func (s *slots) acquire(ctx context.Context, instanceURL string) (release func(), err error) {
	key := hostKey(instanceURL)
	s.mu.Lock()
	h := s.hosts[key]
	if h == nil {
		h = &hostSlots{ch: make(chan struct{}, s.perHost)}
		s.hosts[key] = h
	}
	h.users++
	s.mu.Unlock()
	leave := func() {
		s.mu.Lock()
		if h.users--; h.users == 0 {
			delete(s.hosts, key)
		}
		s.mu.Unlock()
	}
	select {
	case h.ch <- struct{}{}:
	case <-ctx.Done():
		leave()
		return nil, ctx.Err()
	}
	select {
	case s.global <- struct{}{}:
	case <-ctx.Done():
		<-h.ch
		leave()
		return nil, ctx.Err()
	}
	return func() {
		<-s.global
		<-h.ch
		leave()
	}, nil
}

// busyHosts reports how many hosts have calls in flight or waiting.
func (s *slots) busyHosts() int {
	s.mu.Lock()
	defer s.mu.Unlock()
	return len(s.hosts)
}
