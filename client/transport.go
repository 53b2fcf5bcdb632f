package client

import (
	"io"
	"net/http"
	"net/url"
	"strings"

	"golang.org/x/oauth2"
)

// Transport returns an http.RoundTripper that sends requests through base
// (http.DefaultTransport when nil) with the connection's token as
// "Authorization: Bearer". When Acumatica answers 401 it reports that token
// to the broker (once, however many requests saw the same 401 at once: a
// token the broker has already replaced is not reported at all), takes the
// newer token and sends the request again, once, if its body can be sent
// again (no body, or GetBody set, as http.NewRequest does for in-memory
// bodies); otherwise it returns the 401.
//
// The token goes only to the connection's instance: requests whose scheme,
// host and port differ from its instance URL, or whose path is outside its
// virtual directory (https://erp.example.com/AcumaticaERP), are sent as
// they are, without it. So are the requests of redirects that leave the
// instance: an http.Client sends each through the transport again.
//
// Failures to get a token are returned as the request's error, an [*Error].
func (c *Client) Transport(name string, base http.RoundTripper) http.RoundTripper {
	if base == nil {
		base = http.DefaultTransport
	}
	return &transport{s: c.source(name), base: base}
}

// HTTPClient returns an *http.Client whose requests carry the connection's
// token: [Client.Transport] over http.DefaultTransport.
func (c *Client) HTTPClient(name string) *http.Client {
	return &http.Client{Transport: c.Transport(name, nil)}
}

type transport struct {
	s    *source
	base http.RoundTripper
}

func (t *transport) RoundTrip(req *http.Request) (*http.Response, error) {
	ctx := req.Context()
	tok, err := t.s.token(ctx)
	if err != nil {
		closeBody(req)
		return nil, err
	}
	if !onInstance(req.URL, instanceURL(tok)) {
		return t.base.RoundTrip(req)
	}
	resp, err := t.base.RoundTrip(withToken(req, tok.AccessToken))
	if err != nil || resp.StatusCode != http.StatusUnauthorized {
		return resp, err
	}
	// Report the token even when the request cannot be sent again: the
	// next request then has the newer one.
	newer, err := t.s.get(ctx, tok.AccessToken)
	replayable := req.Body == nil || req.Body == http.NoBody || req.GetBody != nil
	if err != nil || newer.AccessToken == tok.AccessToken || !replayable {
		return resp, nil // the 401 is the answer; the broker's error is for Token callers
	}
	retry := withToken(req, newer.AccessToken)
	if req.GetBody != nil {
		body, err := req.GetBody()
		if err != nil {
			return resp, nil
		}
		retry.Body = body
	}
	// The first answer is dropped: read a little so its connection can be
	// reused, then close it.
	io.CopyN(io.Discard, resp.Body, 4<<10)
	resp.Body.Close()
	return t.base.RoundTrip(retry)
}

// instanceURL is the instance URL a token was issued for.
func instanceURL(tok *oauth2.Token) string {
	s, _ := tok.Extra("instance_url").(string)
	return s
}

// onInstance says whether u is on the instance at instance (the broker's
// normalized form, scheme://host[:port][/path]): same scheme, host and
// port, and a path inside the instance's virtual directory. Hosts, and
// paths as IIS serves them, compare without case.
func onInstance(u *url.URL, instance string) bool {
	in, err := url.Parse(instance)
	if err != nil || instance == "" {
		return false
	}
	if !strings.EqualFold(u.Scheme, in.Scheme) || !strings.EqualFold(u.Hostname(), in.Hostname()) || port(u) != port(in) {
		return false
	}
	dir := strings.TrimRight(in.EscapedPath(), "/")
	path := u.EscapedPath()
	return dir == "" || strings.EqualFold(path, dir) ||
		(len(path) > len(dir) && path[len(dir)] == '/' && strings.EqualFold(path[:len(dir)], dir))
}

// port is u's port, the scheme's default when it names none.
func port(u *url.URL) string {
	if p := u.Port(); p != "" {
		return p
	}
	switch strings.ToLower(u.Scheme) {
	case "https":
		return "443"
	case "http":
		return "80"
	}
	return ""
}

// withToken returns a copy of req with the bearer token set: a RoundTripper
// must not change the request it was given.
func withToken(req *http.Request, token string) *http.Request {
	r := req.Clone(req.Context())
	r.Header.Set("Authorization", "Bearer "+token)
	return r
}

func closeBody(req *http.Request) {
	if req.Body != nil {
		req.Body.Close()
	}
}
