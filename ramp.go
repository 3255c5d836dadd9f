package asynqlimit

import (
	"slices"
	"sync"
	"sync/atomic"
)

// ramp counts the running tasks of a queue admitted since the last CPU
// sample. Admission adds their expected use to the sample's, so a burst of
// admissions between two samples counts before the next sample measures it. A task that finishes before the next sample
// takes its share back, so a stream of short tasks, one after another, does
// not add up to a burst.
//
// Each sample starts a new epoch. A task added in an earlier epoch is in the
// sample already and takes nothing back. An add or done that races with the
// start of an epoch can leave the sum off by one task until the next
// sample. A negative sum is possible that way, so total clamps it at zero.
type ramp struct {
	epoch atomic.Uint64
	sum   atomic.Int64
}

// add counts n for a task admitted now and returns the epoch to pass to done.
func (r *ramp) add(n int64) uint64 {
	r.sum.Add(n)
	return r.epoch.Load()
}

// done takes back the n that add counted in epoch, when that is the current
// epoch.
func (r *ramp) done(epoch uint64, n int64) {
	if r.epoch.Load() == epoch {
		r.sum.Add(-n)
	}
}

// reset starts a new epoch at a sample.
func (r *ramp) reset() {
	r.epoch.Add(1)
	r.sum.Store(0)
}

// total returns the sum of the current epoch.
func (r *ramp) total() int64 {
	return max(r.sum.Load(), 0)
}

// unseen sums the memory reservations of running tasks that the samples do
// not show yet. Admission adds a task's reservation, and it stays until the
// task finishes or the resident memory has grown by as much: a task that
// allocates its memory over several sample intervals counts until it has.
// A sample cannot tell which task allocated the growth, so it is taken off
// the oldest reservations first, the tasks most likely to have allocated by
// then. The sum is therefore an estimate.
type unseen struct {
	mu sync.Mutex
	// entries are the reservations with some part unseen, oldest first.
	entries []*unseenEntry
	sum     atomic.Int64
}

// unseenEntry is the part of one task's reservation that the samples do not
// show yet, in bytes, guarded by unseen.mu.
type unseenEntry struct {
	n int64
}

// add counts the reservation n of a task admitted now and returns the entry
// to pass to done, or nil when n is 0.
func (u *unseen) add(n int64) *unseenEntry {
	if n <= 0 {
		return nil
	}
	e := &unseenEntry{n: n}
	u.mu.Lock()
	u.entries = append(u.entries, e)
	u.sum.Add(n)
	u.mu.Unlock()
	return e
}

// done takes back what is left of the reservation of a task that finished.
func (u *unseen) done(e *unseenEntry) {
	if e == nil {
		return
	}
	u.mu.Lock()
	defer u.mu.Unlock()
	if e.n == 0 {
		return // the samples show all of it, and grew dropped the entry
	}
	u.sum.Add(-e.n)
	e.n = 0
	u.entries = slices.DeleteFunc(u.entries, func(x *unseenEntry) bool { return x == e })
}

// grew takes a growth of the resident memory, in bytes, off the oldest
// reservations.
func (u *unseen) grew(n int64) {
	u.mu.Lock()
	defer u.mu.Unlock()
	drop := 0
	for _, e := range u.entries {
		if n <= 0 {
			break
		}
		take := min(e.n, n)
		e.n -= take
		n -= take
		u.sum.Add(-take)
		if e.n == 0 {
			drop++
		}
	}
	u.entries = slices.Delete(u.entries, 0, drop)
}

// total returns the sum.
func (u *unseen) total() int64 { return u.sum.Load() }
