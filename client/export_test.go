package client

// WithClock replaces time.Now, so tests can share a settable clock with the
// broker and the stand-in.
var WithClock = withClock
