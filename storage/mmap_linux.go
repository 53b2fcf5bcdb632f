package storage

import "syscall"

const mapPopulate = syscall.MAP_POPULATE
