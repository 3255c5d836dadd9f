package asynqlimit

import "sync/atomic"

// ramp sums what the running tasks admitted since the last sample hold: the
// memory they reserve, or how many they are. Admission adds it to the last
// sample, so a burst of admissions between two samples counts before the
// next sample measures it. A task that finishes before the next sample
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
