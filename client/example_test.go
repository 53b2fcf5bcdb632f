package client_test

import (
	"context"
	"errors"
	"fmt"
	"io"
	"net/http"
	"time"

	"golang.org/x/oauth2"
	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials/insecure"

	"tokenbroker/client"
)

// A service that calls Acumatica needs three lines: a client over its gRPC
// connection to the broker, an *http.Client for the connection, requests.
// The client caches the token, keeps it fresh from the broker's watch
// stream, and on a 401 reports the token and sends the request again once.
func Example() {
	r := newRig(rigOptions{}) // a broker and an Acumatica stand-in on loopback
	defer r.close()
	cc, err := grpc.NewClient(r.addr, grpc.WithTransportCredentials(insecure.NewCredentials()))
	if err != nil {
		panic(err)
	}
	defer cc.Close()

	c := client.New(cc)
	defer c.Close()
	hc := c.HTTPClient("tenants/acme/connections/erp")

	resp, err := hc.Get(r.entityURL())
	if err != nil {
		panic(err)
	}
	defer resp.Body.Close()
	body, _ := io.ReadAll(resp.Body)
	fmt.Println(resp.Status)
	fmt.Println(len(body) > 2)
	// Output:
	// 200 OK
	// true
}

// TokenSource is an oauth2.TokenSource: use it with oauth2.NewClient, or
// ask it for the token when the token goes somewhere other than an HTTP
// header. Tokens carry their real expiry and the connection's instance URL.
func ExampleClient_TokenSource() {
	r := newRig(rigOptions{})
	defer r.close()
	cc, _ := grpc.NewClient(r.addr, grpc.WithTransportCredentials(insecure.NewCredentials()))
	defer cc.Close()
	c := client.New(cc)
	defer c.Close()

	// Serve tokens only while they have 5 minutes left.
	ts := c.TokenSource("tenants/acme/connections/erp", client.MinValidFor(5*time.Minute))
	tok, err := ts.Token()
	if err != nil {
		panic(err)
	}
	fmt.Println(tok.Type())
	fmt.Println(tok.Extra("instance_url") == r.idpURL)
	fmt.Println(time.Until(tok.Expiry) > 5*time.Minute)

	// oauth2.NewClient sets the header; it does not retry on 401 (use
	// Client.HTTPClient or Client.Transport for that).
	resp, err := oauth2.NewClient(context.Background(), ts).Get(r.entityURL())
	if err != nil {
		panic(err)
	}
	resp.Body.Close()
	fmt.Println(resp.StatusCode)
	// Output:
	// Bearer
	// true
	// true
	// 200
}

// Transport wraps a RoundTripper of your own (timeouts, proxies, tracing).
func ExampleClient_Transport() {
	r := newRig(rigOptions{})
	defer r.close()
	cc, _ := grpc.NewClient(r.addr, grpc.WithTransportCredentials(insecure.NewCredentials()))
	defer cc.Close()
	c := client.New(cc)
	defer c.Close()

	hc := &http.Client{
		Transport: c.Transport("tenants/acme/connections/erp", http.DefaultTransport),
		Timeout:   30 * time.Second,
	}
	resp, err := hc.Get(r.entityURL())
	if err != nil {
		panic(err)
	}
	resp.Body.Close()
	fmt.Println(resp.StatusCode)
	// Output: 200
}

// Errors keep the broker's meaning: test them with errors.Is. The message
// names the connection and the broker's reason, never a token.
func ExampleError() {
	r := newRig(rigOptions{})
	defer r.close()
	cc, _ := grpc.NewClient(r.addr, grpc.WithTransportCredentials(insecure.NewCredentials()))
	defer cc.Close()
	c := client.New(cc)
	defer c.Close()

	_, err := c.TokenSource("tenants/acme/connections/missing").Token()
	fmt.Println(errors.Is(err, client.ErrNotFound))
	fmt.Println(err)

	var e *client.Error
	if errors.As(err, &e) {
		fmt.Println(e.Reason)
	}
	// Output:
	// true
	// client: connection not found "tenants/acme/connections/missing" (CONNECTION_NOT_FOUND): connection tenants/acme/connections/missing not found
	// CONNECTION_NOT_FOUND
}
