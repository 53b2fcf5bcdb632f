package broker

import (
	"context"
	"fmt"
	"io"
	"net/http"
	"net/url"
	"time"
)

// Outcome is the result of reading one entity in [Broker.TestConnection].
type Outcome int

// Outcomes.
const (
	OutcomeOK Outcome = iota + 1
	OutcomeForbidden
	OutcomeNotFound
	OutcomeError
)

// EntityResult is the outcome of reading one entity.
type EntityResult struct {
	Entity     string
	Outcome    Outcome
	HTTPStatus int
	Message    string
}

// TestResult is what [Broker.TestConnection] found.
type TestResult struct {
	ExpireTime time.Time
	Entities   []EntityResult
}

// TestConnection gets a token through the normal serialized path and reads
// each entity once with `GET {instance}/entity/{endpoint}/{entity}?$top=1`,
// so that a role granting too little shows at setup rather than at run time.
func (b *Broker) TestConnection(ctx context.Context, name string, entities []string, endpoint string) (*TestResult, error) {
	if endpoint == "" {
		endpoint = DefaultEndpoint
	}
	tok, err := b.GetAccessToken(ctx, name, MinValidDefault, "")
	if err != nil {
		return nil, err
	}
	ctx = withConnName(ctx, name)
	res := &TestResult{ExpireTime: tok.ExpireTime}
	for _, e := range entities {
		res.Entities = append(res.Entities, b.readEntity(ctx, tok, endpoint, e))
	}
	return res, nil
}

func (b *Broker) readEntity(ctx context.Context, tok Token, endpoint, entity string) EntityResult {
	r := EntityResult{Entity: entity}
	u := tok.InstanceURL + "/entity/" + endpoint + "/" + url.PathEscape(entity) + "?$top=1"
	req, err := http.NewRequestWithContext(ctx, http.MethodGet, u, nil)
	if err != nil {
		r.Outcome, r.Message = OutcomeError, "bad request URL"
		return r
	}
	req.Header.Set("Authorization", "Bearer "+tok.AccessToken)
	req.Header.Set("Accept", "application/json")
	_, span := startUpstream(ctx, b.up.tracer, "probe", http.MethodGet, attrEntity.String(entity))
	resp, err := b.up.client.Do(req)
	endHTTP(span, resp, err)
	if err != nil {
		r.Outcome, r.Message = OutcomeError, "request failed: "+transportKind(err)
		return r
	}
	defer resp.Body.Close()
	io.Copy(io.Discard, io.LimitReader(resp.Body, maxBody))
	r.HTTPStatus = resp.StatusCode
	switch {
	case resp.StatusCode >= 200 && resp.StatusCode < 300:
		r.Outcome, r.Message = OutcomeOK, "readable"
	case resp.StatusCode == http.StatusForbidden:
		r.Outcome, r.Message = OutcomeForbidden, "the integration user's role does not grant this entity"
	case resp.StatusCode == http.StatusNotFound:
		r.Outcome, r.Message = OutcomeNotFound, "no such entity on endpoint "+endpoint
	case resp.StatusCode == http.StatusUnauthorized:
		r.Outcome, r.Message = OutcomeError, "the access token was rejected (401)"
	default:
		r.Outcome, r.Message = OutcomeError, fmt.Sprintf("HTTP %d", resp.StatusCode)
	}
	return r
}
