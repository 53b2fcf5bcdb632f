package server

import (
	"encoding/base64"
	"errors"
	"strings"
)

// Page tokens are opaque to callers: base64url of the parent they belong to
// and the last name served.
const pageTokenVersion = "p1"

func encodePageToken(parent, after string) string {
	if after == "" {
		return ""
	}
	return base64.RawURLEncoding.EncodeToString([]byte(pageTokenVersion + "\x00" + parent + "\x00" + after))
}

func decodePageToken(token, parent string) (string, error) {
	if token == "" {
		return "", nil
	}
	raw, err := base64.RawURLEncoding.DecodeString(token)
	if err != nil {
		return "", errors.New("is not a page token from this service")
	}
	parts := strings.Split(string(raw), "\x00")
	if len(parts) != 3 || parts[0] != pageTokenVersion {
		return "", errors.New("is not a page token from this service")
	}
	if parts[1] != parent {
		return "", errors.New("belongs to another parent; pass the same parent as the first page")
	}
	return parts[2], nil
}
