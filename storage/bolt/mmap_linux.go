package bolt

import (
	"os"
	"strconv"
	"syscall"

	bbolt "go.etcd.io/bbolt"
	"golang.org/x/sys/unix"
)

const mapPopulate = syscall.MAP_POPULATE

// mmapReserve is the size of the data file's memory map while the file is
// smaller (address space only; on 32-bit systems, bbolt's default). bbolt
// remaps as the file outgrows its map, and a remap waits for every open
// read transaction: with room to grow, a long read (a backup's snapshot)
// does not hold up the writes made meanwhile.
const mmapReserve = 1 << 30 * (strconv.IntSize / 64)

// dropMapped tells the kernel this process no longer needs the pages of the
// data file's memory map it has touched (madvise MADV_DONTNEED). The pages
// stay in the page cache; a later read faults them back in. tx must be open:
// bbolt never remaps while a transaction is, so the range stays the map.
func dropMapped(db *bbolt.DB, tx *bbolt.Tx) {
	info := db.Info()
	size := uintptr(tx.Size())
	if page := uintptr(unix.Getpagesize()); size%page != 0 {
		size += page - size%page
	}
	// Advice only: on failure the pages stay resident, as before.
	_, _, _ = unix.Syscall(unix.SYS_MADVISE, info.Data, size, unix.MADV_DONTNEED)
}

// releaseAbandoned unlocks and closes the file of a bbolt.Open that
// panicked. Closing alone would keep the lock: the memory map bbolt made,
// which cannot be unmapped from here, holds the open file, and the lock
// lives as long as it does.
func releaseAbandoned(f *os.File) {
	_ = unix.Flock(int(f.Fd()), unix.LOCK_UN)
	_ = f.Close()
}
