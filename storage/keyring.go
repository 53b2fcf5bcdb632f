package storage

import (
	"bytes"
	"crypto/aes"
	"crypto/cipher"
	"crypto/rand"
	"crypto/sha256"
	"encoding/base64"
	"encoding/hex"
	"errors"
	"fmt"
	"io/fs"
	"os"
	"strings"
	"unsafe"

	storagev1 "tokenbroker/gen/tokenbroker/storage/v1"
)

// KeySize is the length of a data key in bytes (AES-256).
const KeySize = 32

// Keyring seals and opens values with AES-256-GCM from Go's crypto/cipher.
// The first key seals; every key opens, so keys can rotate: put the new key
// first and keep the old ones until every record has been rewritten.
// A Keyring is safe for concurrent use and immutable after construction.
type Keyring struct {
	primary string
	aeads   map[string]cipher.AEAD
	order   []string
}

// NewKeyring returns a keyring over the keys; the first one seals.
func NewKeyring(keys ...[]byte) (*Keyring, error) {
	if len(keys) == 0 {
		return nil, errors.New("storage: keyring needs at least one key")
	}
	k := &Keyring{aeads: make(map[string]cipher.AEAD, len(keys))}
	for i, key := range keys {
		if len(key) != KeySize {
			return nil, fmt.Errorf("storage: key %d is %d bytes, want %d", i+1, len(key), KeySize)
		}
		block, err := aes.NewCipher(key)
		if err != nil {
			return nil, fmt.Errorf("storage: key %d: %w", i+1, err)
		}
		aead, err := cipher.NewGCM(block)
		if err != nil {
			return nil, fmt.Errorf("storage: key %d: %w", i+1, err)
		}
		id := KeyID(key)
		if _, dup := k.aeads[id]; dup {
			continue
		}
		k.aeads[id] = aead
		k.order = append(k.order, id)
	}
	k.primary = k.order[0]
	return k, nil
}

// KeyID is the public id of a key: the first 8 hex digits of its SHA-256.
func KeyID(key []byte) string {
	sum := sha256.Sum256(key)
	return hex.EncodeToString(sum[:4])
}

// PrimaryID is the id of the sealing key.
func (k *Keyring) PrimaryID() string { return k.primary }

// IDs lists the key ids, the sealing key first.
func (k *Keyring) IDs() []string { return append([]string(nil), k.order...) }

// ParseKeys parses key file content: one base64 key per line, the sealing key
// first; blank lines and lines starting with # are skipped. The same format
// serves the TOKENBROKER_KEY environment variable, with commas for newlines.
func ParseKeys(data []byte) (*Keyring, error) {
	var keys [][]byte
	for n, line := range strings.Split(string(data), "\n") {
		line = strings.TrimSpace(line)
		if line == "" || strings.HasPrefix(line, "#") {
			continue
		}
		for _, field := range strings.Split(line, ",") {
			key, err := base64.StdEncoding.DecodeString(strings.TrimSpace(field))
			if err != nil {
				// The line itself is a secret: never echo it.
				return nil, fmt.Errorf("storage: key line %d is not base64", n+1)
			}
			keys = append(keys, key)
		}
	}
	return NewKeyring(keys...)
}

// GenerateKeyFile writes a new random key to path with 0600 permissions. It
// fails if the file exists.
func GenerateKeyFile(path string) error {
	key := make([]byte, KeySize)
	if _, err := rand.Read(key); err != nil {
		return fmt.Errorf("storage: generate key: %w", err)
	}
	content := "# tokenbroker data key (AES-256-GCM); keep secret, back up with the data file\n" +
		base64.StdEncoding.EncodeToString(key) + "\n"
	f, err := os.OpenFile(path, os.O_WRONLY|os.O_CREATE|os.O_EXCL, 0o600)
	if err != nil {
		return fmt.Errorf("storage: create key file: %w", err)
	}
	if _, err := f.WriteString(content); err != nil {
		f.Close()
		return fmt.Errorf("storage: write key file: %w", err)
	}
	if err := f.Sync(); err != nil {
		f.Close()
		return fmt.Errorf("storage: sync key file: %w", err)
	}
	return f.Close()
}

// LoadKeyFile reads a key file. It refuses a file that others may read or
// its group may write. Group read is allowed: Kubernetes mounts a Secret
// owned by root with the pod's fsGroup and mode 0440, the only way a
// non-root container can read it.
func LoadKeyFile(path string) (*Keyring, error) {
	info, err := os.Stat(path)
	if err != nil {
		return nil, fmt.Errorf("storage: key file: %w", err)
	}
	if info.Mode().Perm()&0o037 != 0 {
		return nil, fmt.Errorf("storage: key file %s has mode %v; want 0600, or 0440 for a group of readers (chmod 600 it)", path, info.Mode().Perm())
	}
	data, err := os.ReadFile(path)
	if err != nil {
		return nil, fmt.Errorf("storage: key file: %w", err)
	}
	k, err := ParseKeys(data)
	if err != nil {
		return nil, fmt.Errorf("%w (in %s)", err, path)
	}
	return k, nil
}

// LoadOrGenerateKeyFile loads path, generating it first if it does not exist.
// It reports whether it generated the key.
func LoadOrGenerateKeyFile(path string) (*Keyring, bool, error) {
	generated := false
	if _, err := os.Stat(path); errors.Is(err, fs.ErrNotExist) {
		if err := GenerateKeyFile(path); err != nil {
			return nil, false, err
		}
		generated = true
	}
	k, err := LoadKeyFile(path)
	return k, generated, err
}

func (k *Keyring) seal(plain []byte, aad string) *storagev1.Sealed {
	return k.sealAAD(plain, []byte(aad))
}

// sealAAD seals plain with the primary key, bound to aad.
func (k *Keyring) sealAAD(plain, aad []byte) *storagev1.Sealed {
	aead := k.aeads[k.primary]
	nonce := make([]byte, aead.NonceSize())
	if _, err := rand.Read(nonce); err != nil {
		// crypto/rand never fails on supported platforms (Go 1.24+ panics instead).
		panic(err)
	}
	return &storagev1.Sealed{
		KeyId:      k.primary,
		Nonce:      nonce,
		Ciphertext: aead.Seal(nil, nonce, plain, aad),
	}
}

func (k *Keyring) open(s *storagev1.Sealed, aad string) ([]byte, error) {
	return k.openAAD(s, []byte(aad))
}

// openAAD opens s, which must be bound to aad. A missing seal does not open.
func (k *Keyring) openAAD(s *storagev1.Sealed, aad []byte) ([]byte, error) {
	if s == nil {
		return nil, fmt.Errorf("%w: seal missing", ErrWrongKey)
	}
	aead, ok := k.aeads[s.GetKeyId()]
	if !ok {
		return nil, fmt.Errorf("%w: value sealed with key %q, which is not in the keyring", ErrWrongKey, s.GetKeyId())
	}
	if len(s.GetNonce()) != aead.NonceSize() {
		return nil, fmt.Errorf("%w: bad nonce", ErrNotDataFile)
	}
	// Decrypt in place: the ciphertext is the decoder's own copy and is not
	// used again, so its storage can hold the plaintext.
	ct := s.GetCiphertext()
	plain, err := aead.Open(ct[:0], s.GetNonce(), ct, aad)
	if err != nil {
		return nil, fmt.Errorf("%w: sealed value does not open with key %q", ErrWrongKey, s.GetKeyId())
	}
	return plain, nil
}

// sealString seals a string field; empty values are not stored.
func (k *Keyring) sealString(v, name, field string) *storagev1.Sealed {
	if v == "" {
		return nil
	}
	return k.seal([]byte(v), name+"\x00"+field)
}

func (k *Keyring) openString(s *storagev1.Sealed, name, field string) (string, error) {
	if s == nil {
		return "", nil
	}
	b, err := k.open(s, name+"\x00"+field)
	if err != nil {
		return "", fmt.Errorf("%s %s: %w", name, field, err)
	}
	if len(b) == 0 {
		return "", nil
	}
	// b is the decoded record's own buffer and is referenced nowhere else:
	// share it instead of copying (tokens are read back at every start).
	return unsafe.String(&b[0], len(b)), nil
}

// current reports whether s was sealed with the sealing key; a value sealed
// with an older key is resealed when its record is next written. An absent
// value needs no key.
func (k *Keyring) current(s *storagev1.Sealed) bool {
	return s == nil || s.GetKeyId() == k.primary
}

var canaryPlain = []byte("tokenbroker canary v1")

func (k *Keyring) checkCanary(s *storagev1.Sealed) error {
	b, err := k.open(s, canaryAAD)
	if err != nil {
		return err
	}
	if !bytes.Equal(b, canaryPlain) {
		return ErrWrongKey
	}
	return nil
}
