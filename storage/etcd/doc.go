// Package etcd is tokenbroker's store for several replicas: connections and
// token chains in an etcd cluster ([Open], [Store]), with cluster-wide
// per-connection locks ([Store.Lock]) that fence token writes and a change
// feed ([Store.Watch]) that keeps the replicas' caches coherent. Pending
// Authorization Code flows are kept there too ([Store.PutAuthorization],
// [Store.TakeAuthorization]), sealed and leased, so any replica completes
// one, once.
//
// Every write returns once the cluster has committed it.
//
// This package must never import the broker or the API messages, never
// log, and never return a secret in an error.
package etcd
