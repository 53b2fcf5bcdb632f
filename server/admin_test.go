package server_test

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"strings"
	"testing"

	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"

	adminv1 "tokenbroker/gen/tokenbroker/admin/v1"

	"tokenbroker/server/servertest"
)

// backupAll reads a whole backup stream: its header and records.
func backupAll(ctx context.Context, c adminv1.AdminBrokerClient) (*adminv1.BackupHeader, []*adminv1.BackupRecord, error) {
	stream, err := c.Backup(ctx, &adminv1.BackupRequest{})
	if err != nil {
		return nil, nil, err
	}
	var h *adminv1.BackupHeader
	var recs []*adminv1.BackupRecord
	for {
		msg, err := stream.Recv()
		if errors.Is(err, io.EOF) {
			return h, recs, nil
		}
		if err != nil {
			return nil, nil, err
		}
		if msg.GetHeader() != nil {
			h = msg.GetHeader()
		}
		recs = append(recs, msg.GetRecords()...)
	}
}

// The admin service is for operators of every tenant: an operator of one
// tenant and a consumer are denied both its streaming and unary methods,
// a stranger is not authenticated.
func TestAdminServiceIsForOperatorsOfEveryTenant(t *testing.T) {
	tf := newTLSFixture(t, 0)
	ctx := context.Background()
	for _, tc := range []struct {
		who  string
		want codes.Code
	}{
		{"spiffe://corp.test/ops/root", codes.OK},
		{"spiffe://corp.test/ops/acme-team", codes.PermissionDenied},
		{"spiffe://corp.test/svc/orders", codes.PermissionDenied},
		{"spiffe://corp.test/svc/stranger", codes.Unauthenticated},
	} {
		t.Run(tc.who, func(t *testing.T) {
			cert := tf.ca.Issue(t, servertest.Leaf{URI: tc.who})
			_, cc := tf.client(t, &cert)
			admin := adminv1.NewAdminBrokerClient(cc)
			h, recs, err := backupAll(ctx, admin)
			if status.Code(err) != tc.want {
				t.Fatalf("Backup: %v, want %v", err, tc.want)
			}
			_, err = admin.GetKeyStatus(ctx, &adminv1.GetKeyStatusRequest{})
			if status.Code(err) != tc.want {
				t.Errorf("GetKeyStatus: %v, want %v", err, tc.want)
			}
			rekey, err := admin.Rekey(ctx, &adminv1.RekeyRequest{})
			if err == nil {
				_, err = rekey.Recv()
			}
			if status.Code(err) != tc.want {
				t.Errorf("Rekey: %v, want %v", err, tc.want)
			}
			if tc.want != codes.OK {
				return
			}
			if h.GetConnectionCount() != 3 || len(recs) != 3 || h.GetStore() != "bbolt" || len(h.GetMeta()) == 0 {
				t.Fatalf("backup: header %v, %d records; want 3 connections from bbolt with a meta record", h, len(recs))
			}
			if recs[0].GetName() != "tenants/acme/connections/erp" || len(recs[0].GetTokens()) == 0 {
				t.Errorf("first record %q with %d token bytes", recs[0].GetName(), len(recs[0].GetTokens()))
			}
			for _, r := range recs {
				blob := string(r.GetConnection()) + string(r.GetTokens())
				for _, secret := range append([]string{clientSecret, password}, tf.idp.Issued()...) {
					if strings.Contains(blob, secret) {
						t.Errorf("backup of %s holds secret %.6s... in plain text", r.GetName(), secret)
					}
				}
			}
		})
	}
}

// Key status counts every stored value, meta record included; on one key
// nothing needs an older one.
func TestKeyStatusCountsEveryRecord(t *testing.T) {
	tf := newTLSFixture(t, 0)
	cert := tf.ca.Issue(t, servertest.Leaf{URI: "spiffe://corp.test/ops/root"})
	_, cc := tf.client(t, &cert)
	st, err := adminv1.NewAdminBrokerClient(cc).GetKeyStatus(context.Background(), &adminv1.GetKeyStatusRequest{})
	if err != nil {
		t.Fatal(err)
	}
	// 3 connections: 3 connection records, 3 token records, 1 meta record.
	if st.GetRecords() != 7 || st.GetRecordsNeedingOlderKeys() != 0 || len(st.GetKeyUses()) != 1 || st.GetKeyUses()[0].GetRecords() != 7 {
		t.Errorf("key status = %v; want 7 records, all with the sealing key", st)
	}
}

// TestAdminCallsAreAudited: Backup and GetKeyStatus, allowed or denied,
// each write an audit line with the caller, the method and the outcome
// (a backup with its record count), and no stored value or secret.
func TestAdminCallsAreAudited(t *testing.T) {
	tf := newTLSFixture(t, 0)
	ctx := context.Background()
	root := tf.ca.Issue(t, servertest.Leaf{URI: "spiffe://corp.test/ops/root"})
	_, cc := tf.client(t, &root)
	admin := adminv1.NewAdminBrokerClient(cc)
	_, recs, err := backupAll(ctx, admin)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := admin.GetKeyStatus(ctx, &adminv1.GetKeyStatusRequest{}); err != nil {
		t.Fatal(err)
	}
	acme := tf.ca.Issue(t, servertest.Leaf{URI: "spiffe://corp.test/ops/acme-team"})
	_, denied := tf.client(t, &acme)
	if _, err := adminv1.NewAdminBrokerClient(denied).GetKeyStatus(ctx, &adminv1.GetKeyStatusRequest{}); status.Code(err) != codes.PermissionDenied {
		t.Fatalf("acme operator's GetKeyStatus: %v", err)
	}
	tf.auditor.Close()
	text := tf.audit.String()
	var got []string
	for _, l := range strings.Split(strings.TrimSpace(text), "\n") {
		var m map[string]any
		if err := json.Unmarshal([]byte(l), &m); err != nil {
			t.Fatalf("audit line %q: %v", l, err)
		}
		got = append(got, fmt.Sprint(m["caller"], " ", m["method"], " ", m["outcome"], " ", m["records"]))
	}
	want := []string{
		fmt.Sprint("spiffe://corp.test/ops/root /tokenbroker.admin.v1.AdminBroker/Backup OK ", len(recs)),
		"spiffe://corp.test/ops/root /tokenbroker.admin.v1.AdminBroker/GetKeyStatus OK <nil>",
		"spiffe://corp.test/ops/acme-team /tokenbroker.admin.v1.AdminBroker/GetKeyStatus PermissionDenied <nil>",
	}
	if fmt.Sprint(got) != fmt.Sprint(want) {
		t.Fatalf("audit lines:\n%s\nwant (caller method outcome records):\n%s", strings.Join(got, "\n"), strings.Join(want, "\n"))
	}
	for _, secret := range append([]string{clientSecret, password}, tf.idp.Issued()...) {
		if strings.Contains(text, secret) {
			t.Errorf("audit log holds secret %.6s...", secret)
		}
	}
	for _, r := range recs {
		if len(r.GetTokens()) > 0 && strings.Contains(text, string(r.GetTokens())) || strings.Contains(text, string(r.GetConnection())) {
			t.Errorf("audit log holds the stored record of %s", r.GetName())
		}
	}
}
