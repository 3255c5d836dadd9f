package asynqlimit

import (
	"context"
	"fmt"
	"log/slog"
	"math"
	"sync/atomic"
	"time"

	"github.com/hibiken/asynq"

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
	// admitted since the last sample, and finishedSince is the CPU time of
	// the tasks that finished since then, in nanoseconds, written under
	// runsMu. Admission adds them up, so the tasks admitted between two
	// samples cannot take the queue far over its budget before the next
	// sample measures them.
	recent        atomic.Uint64
	perTask       atomic.Uint64
	pending       ramp
	finishedSince atomic.Int64
}

// usedCores returns the queue's average CPU use over the window, in cores.
func (q *queueState) usedCores() float64 {
	return math.Float64frombits(q.cpu.cores.Load())
}

// projectedCores returns the CPU use that admission compares with the
// budget: the larger of the window's average and the last interval's use,
// plus what the tasks admitted since the last sample add. A finished one
// adds its CPU time spread over the window, as the next sample will count
// it, and a running one adds the last sample's use per running task.
func (q *queueState) projectedCores(window time.Duration) float64 {
	recent := math.Float64frombits(q.cpu.recent.Load())
	perTask := math.Float64frombits(q.cpu.perTask.Load())
	finished := time.Duration(q.cpu.finishedSince.Load()).Seconds() / window.Seconds()
	return max(q.usedCores(), recent) + finished + float64(q.cpu.pending.total())*perTask
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
	r.thread, r.hasThread = th, err == nil
	q.runsMu.Unlock()
	if err != nil {
		r.l.logEvent(r.ctx, q, r.task, slog.LevelWarn, "asynqlimit: measuring the task's CPU time failed", "error", err)
	}
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
		used, err = r.thread.Unlock()
	}

	q.runsMu.Lock()
	delete(q.runs, r)
	r.hasThread = false
	if locked && err == nil {
		q.cpu.finished += used
		q.cpu.finishedSince.Add(int64(used))
	}
	if r.grant.cpuPending {
		q.cpu.pending.done(r.grant.cpuEpoch, 1)
	}
	q.runsMu.Unlock()
	switch {
	case err != nil:
		r.l.logEvent(r.ctx, q, r.task, slog.LevelWarn, "asynqlimit: reading the task's CPU time failed", "error", err)
	case locked:
		q.metrics.taskCPU.Observe(used.Seconds())
	}
}

// sampleCPU updates the CPU use of every queue that accounts CPU and stops
// the tasks over their TaskCPU limit.
func (l *Limiter) sampleCPU(now time.Time) {
	l.eachQueue(func(q *queueState) {
		if q.cpuAccounting {
			l.sampleQueueCPU(q, now)
		}
	})
}

func (l *Limiter) sampleQueueCPU(q *queueState, now time.Time) {
	q.runsMu.Lock()
	total := q.cpu.finished
	running := 0
	for r := range q.runs {
		if !r.hasThread {
			continue
		}
		running++
		used, err := r.thread.Used()
		if err != nil {
			continue // the task is finishing; its time arrives in finished
		}
		total += used
		if q.budget.TaskCPU > 0 && used > q.budget.TaskCPU {
			l.stopOverCPU(r, used)
		}
	}
	q.cpu.pending.reset()
	q.cpu.finishedSince.Store(0)
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
	q.metrics.cpuCores.Set(cores)
}

// stopOverCPU ends the context of a task over its queue's TaskCPU limit. The
// caller holds q.runsMu.
func (l *Limiter) stopOverCPU(r *taskRun, used time.Duration) {
	if r.overCPU.Load() {
		return
	}
	l.logEvent(r.ctx, r.q, r.task, slog.LevelWarn, "asynqlimit: task used more CPU time than its queue's TaskCPU",
		"cpu_time", used, "task_cpu", r.q.budget.TaskCPU, "mode", l.limits.Mode.String())
	r.q.metrics.timeouts.Inc()
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
	used := q.projectedCores(l.cpuWindow)
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
