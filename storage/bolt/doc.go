// Package bolt is tokenbroker's embedded store: one process's connections
// and token chains in a single bbolt file ([Open], [Store]).
//
// Every write is durable before the call returns; concurrent writes share
// one transaction and one fsync (a group committer). A file that is held by
// another process, foreign, damaged or sealed with another key is refused
// at [Open] without being modified; bbolt is only ever called under a guard
// that turns its panics and faults on a damaged page into an error.
// [Store.Healthy] says when the store can no longer keep writes (its file
// deleted or replaced, damaged, or the disk refusing writes), and such
// writes are refused rather than lost.
//
// A delete is two writes: [Store.MarkDeleting] moves the connection record
// out of the live ones, and [Store.DeleteConnection] erases it, then
// replaces the file with a compacted copy before it returns, since bbolt
// leaves the bytes of freed pages in place.
//
// This package must never import the broker, gRPC or the API messages,
// never log, and never return a secret in an error.
package bolt
