package server

import (
	"context"
	"fmt"
	"time"

	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"

	pb "tokenbroker/gen/tokenbroker/v1"

	"tokenbroker/broker"
)

// Request limits.
const (
	defaultPageSize = 50
	maxPageSize     = 1000
	maxMinValidFor  = 30 * time.Minute
	maxEntities     = 20
	maxTokenLen     = 16 << 10
)

// outputOnly are Connection fields an update mask may not name.
var outputOnly = map[string]bool{
	"name": true, "client_secret_set": true, "password_set": true, "state": true, "status": true,
	"create_time": true, "update_time": true, "etag": true,
}

type violations []broker.FieldViolation

func (v *violations) add(field, format string, args ...any) {
	*v = append(*v, broker.FieldViolation{Field: field, Description: fmt.Sprintf(format, args...)})
}

func (v *violations) name(field, name string) {
	if _, _, err := broker.ParseConnectionName(name); err != nil {
		v.add(field, "%s", err.Error())
	}
}

// validator checks requests before any handler work.
type validator struct {
	upstream broker.UpstreamRules
}

// unary is the validation interceptor: an invalid request never reaches a
// handler and gets INVALID_ARGUMENT with one field violation per bad field.
func (val validator) unary(ctx context.Context, req any, _ *grpc.UnaryServerInfo, handler grpc.UnaryHandler) (resp any, err error) {
	v, perr := val.check(req)
	if perr != nil {
		return nil, perr
	}
	if len(v) > 0 {
		return nil, invalidArgument(v)
	}
	return handler(ctx, req)
}

// check validates req; a panic in a validator becomes INTERNAL.
func (val validator) check(req any) (v violations, err error) {
	defer func() {
		if r := recover(); r != nil {
			err = withDetails(codes.Internal, "internal error", "INTERNAL", "", 0, nil)
		}
	}()
	if paths := badUTF8Paths(req); len(paths) > 0 {
		// The other checks would judge the U+FFFD put in place of the bad
		// bytes: name the cause instead.
		for _, p := range paths {
			v.add(p, "is not valid UTF-8")
		}
		return v, nil
	}
	if checkAuthCodeRequest(req, &v) {
		return v, nil
	}
	switch r := req.(type) {
	case *pb.CreateConnectionRequest:
		val.checkCreate(r, &v)
	case *pb.GetConnectionRequest:
		v.name("name", r.GetName())
	case *pb.DeleteConnectionRequest:
		v.name("name", r.GetName())
		v.etag("etag", r.GetEtag())
	case *pb.ListConnectionsRequest:
		checkList(r, &v)
	case *pb.UpdateConnectionRequest:
		val.checkUpdate(r, &v)
	case *pb.TestConnectionRequest:
		checkTest(r, &v)
	case *pb.GetAccessTokenRequest:
		checkToken(r, &v)
	}
	return v, nil
}

// etag checks an optional etag.
func (v *violations) etag(field, e string) {
	if e == "" {
		return
	}
	if _, ok := broker.ParseETag(e); !ok {
		v.add(field, "is not an etag this service issued")
	}
}

// checkNewConnection checks the fields that name a connection to create:
// its parent tenant, its id, and that the connection is given.
func checkNewConnection(parent, id string, given bool, v *violations) {
	if _, err := broker.ParseParent(parent, false); err != nil {
		v.add("parent", "%s", err.Error())
	}
	if !broker.ValidID(id) {
		v.add("connection_id", "must match [a-z][a-z0-9-]{0,62}")
	}
	if !given {
		v.add("connection", "is required")
	}
}

func (val validator) checkCreate(r *pb.CreateConnectionRequest, v *violations) {
	checkNewConnection(r.GetParent(), r.GetConnectionId(), r.GetConnection() != nil, v)
	if r.GetConnection() == nil {
		return
	}
	c := fromProto(r.GetConnection())
	for _, fv := range broker.Normalize(c, nil, val.upstream) {
		v.add("connection."+fv.Field, "%s", fv.Description)
	}
}

func checkList(r *pb.ListConnectionsRequest, v *violations) {
	if _, err := broker.ParseParent(r.GetParent(), true); err != nil {
		v.add("parent", "%s (use tenants/- for all tenants)", err.Error())
	}
	if r.GetPageSize() < 0 {
		v.add("page_size", "must not be negative")
	}
	if _, err := decodePageToken(r.GetPageToken(), r.GetParent()); err != nil {
		v.add("page_token", "%s", err.Error())
	}
}

func checkTest(r *pb.TestConnectionRequest, v *violations) {
	v.name("name", r.GetName())
	if len(r.GetEntities()) > maxEntities {
		v.add("entities", "at most %d entities", maxEntities)
	}
	for i, e := range r.GetEntities() {
		if !broker.ValidEntity(e) {
			v.add(fmt.Sprintf("entities[%d]", i), "must be an entity name such as SalesOrder")
		}
	}
	if e := r.GetEndpoint(); e != "" && !broker.ValidEndpoint(e) {
		v.add("endpoint", "must have the form Name/Version, e.g. %s", broker.DefaultEndpoint)
	}
}

func checkToken(r *pb.GetAccessTokenRequest, v *violations) {
	v.name("name", r.GetName())
	if d := r.GetMinValidFor(); d != nil {
		if err := d.CheckValid(); err != nil {
			v.add("min_valid_for", "is not a valid duration")
		} else if dd := d.AsDuration(); dd < 0 || dd > maxMinValidFor {
			v.add("min_valid_for", "must be between 0 and %v", maxMinValidFor)
		}
	}
	if len(r.GetRejectedAccessToken()) > maxTokenLen {
		v.add("rejected_access_token", "is longer than %d bytes", maxTokenLen)
	} else if err := broker.CheckText(r.GetRejectedAccessToken()); err != nil {
		v.add("rejected_access_token", "%s", err.Error())
	}
}

func (val validator) checkUpdate(r *pb.UpdateConnectionRequest, v *violations) {
	if r.GetConnection() == nil {
		v.add("connection", "is required")
		return
	}
	v.name("connection.name", r.GetConnection().GetName())
	paths := r.GetUpdateMask().GetPaths()
	if len(paths) == 0 {
		v.add("update_mask", `is required: name the fields to change, e.g. {"paths": ["client_secret"]}`)
		return
	}
	seen := map[string]bool{}
	var fields []string
	for _, p := range paths {
		switch {
		case outputOnly[p]:
			v.add("update_mask", "%q is output only", p)
		case p == "*":
			v.add("update_mask", "wildcard is not supported; name each field")
		default:
			if _, ok := broker.Updatable[p]; !ok {
				v.add("update_mask", "unknown field %q", p)
			} else if seen[p] {
				v.add("update_mask", "%q named twice", p)
			} else {
				seen[p] = true
				fields = append(fields, p)
			}
		}
	}
	v.etag("connection.etag", r.GetConnection().GetEtag())
	if len(fields) == 0 {
		return
	}
	c := fromProto(r.GetConnection())
	for _, fv := range broker.Normalize(c, fields, val.upstream) {
		v.add("connection."+fv.Field, "%s", fv.Description)
	}
}
