package asynqlimit

import (
	"context"
	"fmt"
	"log/slog"
	"math"
	"sync/atomic"
	"time"

	"github.com/hibiken/asynq"
	"github.com/prometheus/client_golang/prometheus"

	"github.com/asynqlimit/asynqlimit/internal/threadcpu"
)

// DefaultCPUWindow is the window over which a queue's CPU use is averaged
// for its CPU budget.
const DefaultCPUWindow = time.Second

// cpuReading is a queue's total CPU time at one instant.
type cpuReading struct {
	at    time.Time
	total time.Duration
}

// queueCPU is the CPU accounting of one queue. Finished tasks add their CPU
// time to finished under the queue's runsMu, in the same critical section
// that untracks them, so that a reading of finished plus the running tasks'
// CPU time counts every task exactly once.
type queueCPU struct {
	finished time.Duration
	// readings holds the totals of the current window, oldest first; only
	// the sampling goroutine uses it.
	readings []cpuReading
	// cores is the float64 bits of the average use over the window, read by
	// admission without a lock.
	cores atomic.Uint64
	// recent is the float64 bits of the use over the last sample interval.
	// perTask is the float64 bits of that use per running task, 1 core until
	// a sample has measured running tasks. pending counts the running tasks
	// admitted since the last sample. finishedSince is the CPU time, in
	// nanoseconds, that the tasks finished since then used after it, written
	// under runsMu, and sampledAt is the time of that sample in nanoseconds
	// since base, the monotonic time the queue's state was made. Admission
	// projects the queue's use from them, so the tasks admitted between two
	// samples cannot take the queue far over its budget before the next
	// sample measures them.
	recent        atomic.Uint64
	perTask       atomic.Uint64
	pending       ramp
	finishedSince atomic.Int64
	sampledAt     atomic.Int64
	base          time.Time
}

// usedCores returns the queue's average CPU use over the window, in cores.
func (q *queueState) usedCores() float64 {
	return math.Float64frombits(q.cpu.cores.Load())
}

// perTaskCores returns the last sample's CPU use per running task, 1 core
// until a sample has measured running tasks.
func (q *queueState) perTaskCores() float64 {
	return math.Float64frombits(q.cpu.perTask.Load())
}

// projectedCores returns the CPU use that admission compares with the
// budget at now: the largest of the window's average, the last interval's
// use and the use of the tasks finished since the last sample, plus the
// last sample's use per running task for each running task admitted since.
// The three rates measure the same work over different spans, so they are
// compared rather than added.
func (q *queueState) projectedCores(now time.Time) float64 {
	recent := math.Float64frombits(q.cpu.recent.Load())
	perTask := q.perTaskCores()
	finished := 0.0
	if cpu := q.cpu.finishedSince.Load(); cpu > 0 {
		// A task's CPU time since the sample is at most the time since the
		// sample, so the rate is at most the number of tasks that ran at once.
		// The floor keeps a clock step from dividing by zero.
		elapsed := max(int64(now.Sub(q.cpu.base))-q.cpu.sampledAt.Load(), int64(time.Millisecond))
		finished = float64(cpu) / float64(elapsed)
	}
	return max(q.usedCores(), recent, finished) + float64(q.cpu.pending.total())*perTask
}

// lockThread locks the run's goroutine to its thread and tracks the run,
// when the queue accounts CPU. Tracking here, rather than in run, takes the
// queue's lock once at each end.
func (r *taskRun) lockThread() {
	q := r.q
	if !q.cpuAccounting {
		return
	}
	th, err := threadcpu.Lock()
	q.runsMu.Lock()
	q.runs[r] = struct{}{}
	r.thread, r.hasThread, r.cpuSampled = th, err == nil, 0
	q.runsMu.Unlock()
	if err != nil {
		r.warnCPU("asynqlimit: measuring the task's CPU time failed", err)
	}
}

// warnCPU logs a failed read of a task's CPU time. It has a frame of its
// own, so that lockThread and unlockThread keep small frames on the stack of
// the task's goroutine, which starts small.
//
//go:noinline
func (r *taskRun) warnCPU(msg string, err error) {
	r.l.logEvent(r.ctx, r.q, r.task, slog.LevelWarn, msg, "error", err)
}

// unlockThread undoes lockThread on the same goroutine, untracks the run and
// records the task's CPU time.
func (r *taskRun) unlockThread() {
	q := r.q
	if !q.cpuAccounting {
		return
	}
	var used time.Duration
	var err error
	locked := r.hasThread // written only by this goroutine
	if locked {
		// The goroutine stays on its thread until the run is untracked, so
		// that a sample never reads the thread once other goroutines may
		// run on it.
		used, err = r.thread.Used()
	}

	q.runsMu.Lock()
	delete(q.runs, r)
	r.hasThread = false
	if locked && err == nil {
		// A sample that ran after the read above saw a little more: the
		// thread's few instructions on the way to runsMu.
		used = max(used, r.cpuSampled)
		q.cpu.finished += used
		q.cpu.finishedSince.Add(int64(used - r.cpuSampled))
		// In observe mode, count a task that went over its TaskCPU between
		// two samples too. In enforce mode, a task that finished before a
		// sample saw it over the limit keeps the outcome it returned.
		if r.l.limits.Mode == Observe && q.budget.TaskCPU > 0 && used > q.budget.TaskCPU {
			r.l.stopOverCPU(r, used)
		}
	}
	if q.budget.CPU > 0 { // admit counted the task in the ramp
		q.cpu.pending.done(r.grant.cpuEpoch, 1)
	}
	q.runsMu.Unlock()
	if locked {
		r.thread.Release()
	}
	switch {
	case err != nil:
		r.warnCPU("asynqlimit: reading the task's CPU time failed", err)
	case locked:
		q.metrics.taskCPU.Observe(used.Seconds())
	}
}

// sampleCPU updates the CPU use of every queue that accounts CPU and stops
// the tasks over their TaskCPU limit. The unnamed queues share the gauge of
// the "other" label, which shows their sum.
func (l *Limiter) sampleCPU() {
	var other prometheus.Gauge
	otherCores := 0.0
	l.eachQueue(func(q *queueState) {
		if !q.cpuAccounting {
			return
		}
		cores := l.sampleQueueCPU(q)
		if q.label == otherLabel {
			other, otherCores = q.metrics.cpuCores, otherCores+cores
			return
		}
		q.metrics.cpuCores.Set(cores)
	})
	if other != nil {
		other.Set(otherCores)
	}
}

// sampleQueueCPU updates the CPU use of q and returns its average over the
// window, in cores. The time of the sample is taken under the lock, next to
// the readings: a time taken earlier, before a delay of the sampling
// goroutine, would make the use over the interval look higher.
func (l *Limiter) sampleQueueCPU(q *queueState) float64 {
	q.runsMu.Lock()
	now := time.Now()
	total := q.cpu.finished
	running := 0
	for r := range q.runs {
		if r.inline {
			l.noticeAbandoned(r, now)
		}
		if !r.hasThread {
			continue
		}
		running++
		used, err := r.thread.Used()
		if err != nil {
			continue // the task is finishing; its time arrives in finished
		}
		total += used
		r.cpuSampled = used
		if q.budget.TaskCPU > 0 && used > q.budget.TaskCPU {
			l.stopOverCPU(r, used)
		}
	}
	q.cpu.pending.reset()
	q.cpu.finishedSince.Store(0)
	q.cpu.sampledAt.Store(int64(now.Sub(q.cpu.base)))
	q.runsMu.Unlock()

	if n := len(q.cpu.readings); n > 0 && now.After(q.cpu.readings[n-1].at) {
		last := q.cpu.readings[n-1]
		recent := (total - last.total).Seconds() / now.Sub(last.at).Seconds()
		q.cpu.recent.Store(math.Float64bits(recent))
		if running > 0 {
			q.cpu.perTask.Store(math.Float64bits(recent / float64(running)))
		}
	}
	q.cpu.readings = append(q.cpu.readings, cpuReading{at: now, total: total})
	cutoff := now.Add(-l.cpuWindow)
	drop := 0
	for drop < len(q.cpu.readings)-1 && !q.cpu.readings[drop+1].at.After(cutoff) {
		drop++
	}
	q.cpu.readings = q.cpu.readings[drop:]

	cores := 0.0
	if first := q.cpu.readings[0]; now.After(first.at) {
		cores = (total - first.total).Seconds() / now.Sub(first.at).Seconds()
	}
	q.cpu.cores.Store(math.Float64bits(cores))
	return cores
}

// noticeAbandoned marks an inline run as abandoned when its handler still
// runs a grace period after a sample found its context ended. The gauge and
// the log then match those of a handler in a goroutine of its own, up to two
// sample intervals later. The caller holds q.runsMu.
func (l *Limiter) noticeAbandoned(r *taskRun, now time.Time) {
	if r.ctx.Err() == nil || r.state.Load() != runRunning {
		return
	}
	if r.endedSeen.IsZero() {
		r.endedSeen = now
	}
	if now.Sub(r.endedSeen) < l.abandonGrace {
		return
	}
	// Counted before the swap, as in awaitGrace.
	r.q.metrics.abandoned.Inc()
	if !r.state.CompareAndSwap(runRunning, runAbandoned) {
		r.q.metrics.abandoned.Dec()
		return
	}
	l.logAbandoned(r)
	ctxErr := r.ctx.Err()
	r.q.metrics.outcomes[outcomeOf(ctxErr, ctxErr)].Inc()
}

// noticeAbandonedAtClose goes on counting the inline runs that outlive their
// context after Close stops the CPU samples. Server.Shutdown calls Close
// right after asynq has ended the context of every task still running, so
// it checks those runs now and once more after the grace period.
func (l *Limiter) noticeAbandonedAtClose() {
	if l.sweepAbandoned() {
		time.AfterFunc(l.abandonGrace, func() { l.sweepAbandoned() })
	}
}

// sweepAbandoned checks every inline run for abandonment. It reports
// whether a run with an ended context still runs and is not yet counted.
func (l *Limiter) sweepAbandoned() (waiting bool) {
	now := time.Now()
	l.eachQueue(func(q *queueState) {
		if !q.cpuAccounting {
			return
		}
		q.runsMu.Lock()
		defer q.runsMu.Unlock()
		for r := range q.runs {
			if !r.inline {
				continue
			}
			l.noticeAbandoned(r, now)
			if r.state.Load() == runRunning && !r.endedSeen.IsZero() {
				waiting = true
			}
		}
	})
	return waiting
}

// stopOverCPU ends the context of a task over its queue's TaskCPU limit. The
// caller holds q.runsMu.
func (l *Limiter) stopOverCPU(r *taskRun, used time.Duration) {
	if r.overCPU.Load() {
		return
	}
	l.logEvent(r.ctx, r.q, r.task, slog.LevelWarn, "asynqlimit: task used more CPU time than its queue's TaskCPU",
		"cpu_time", used, "task_cpu", r.q.budget.TaskCPU, "mode", l.limits.Mode.String())
	r.countTimeout()
	if l.limits.Mode == Observe {
		r.overCPU.Store(true) // counted once
		return
	}
	r.overCPU.Store(true)
	select {
	case r.stop <- struct{}{}:
	default:
	}
}

// admitCPU returns the error that defers a task of a queue over its CPU
// budget. In observe mode, and for a task on its last attempt, it only counts
// and logs the decision.
func (l *Limiter) admitCPU(ctx context.Context, q *queueState, t *asynq.Task) error {
	if !q.cpuAccounting || q.budget.CPU == 0 {
		return nil
	}
	used := q.projectedCores(time.Now())
	if used < q.budget.CPU {
		return nil
	}
	if l.limits.Mode == Enforce && !lastAttempt(ctx) {
		return l.deferTask(ctx, q, t, ReasonCPU)
	}
	q.metrics.deferrals[ReasonCPU].Inc()
	l.logEvent(ctx, q, t, slog.LevelInfo, "asynqlimit: task would be deferred for CPU; it runs because of observe mode or its last attempt",
		"reason", ReasonCPU, "cpu_cores", used, "cpu_budget_cores", q.budget.CPU)
	return nil
}

// overCPUError returns the error of a task stopped for its CPU time. It
// matches ErrTimedOut and context.DeadlineExceeded.
func overCPUError(q *queueState) error {
	return fmt.Errorf("%w: task used more than the TaskCPU of %s of queue %q: %w",
		ErrTimedOut, q.budget.TaskCPU, q.name, context.DeadlineExceeded)
}

// cpuAccountingNote returns why CPU budgets cannot be measured here, or "".
func cpuAccountingNote(disabled bool) string {
	switch {
	case disabled:
		return "WithoutCPUAccounting turned CPU accounting off"
	case !threadcpu.Supported():
		return "thread CPU time is measured only on Linux"
	}
	return ""
}
