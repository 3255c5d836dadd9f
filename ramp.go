package asynqlimit

import "sync/atomic"

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
// task finishes or the resident memory grows by as much: a task that
// allocates its memory over several sample intervals counts until it has.
// The growth of memory is taken off the sum as a whole, because a sample
// cannot tell which task allocated it, so the sum is an estimate. It never
// goes below zero.
type unseen struct {
	sum atomic.Int64
}

// add counts the reservation n of a task admitted now.
func (u *unseen) add(n int64) { u.sum.Add(n) }

// done takes back the reservation n of a task that finished.
func (u *unseen) done(n int64) { u.sub(n) }

// grew takes a growth of the resident memory, in bytes, off the sum.
func (u *unseen) grew(n int64) {
	if n > 0 {
		u.sub(n)
	}
}

func (u *unseen) sub(n int64) {
	for {
		old := u.sum.Load()
		if u.sum.CompareAndSwap(old, max(old-n, 0)) {
			return
		}
	}
}

// total returns the sum.
func (u *unseen) total() int64 { return u.sum.Load() }
