package asynqlimit

import (
	"context"
	"fmt"
	"log/slog"
	"time"

	"github.com/hibiken/asynq"
)

// MemoryEstimator returns the memory, in bytes, that a task of queue is
// expected to use while it runs. Go cannot measure the memory of one
// goroutine, so a queue's memory budget is a budget of these estimates, not
// of measured use.
type MemoryEstimator func(queue string, t *asynq.Task) int64

// maxReservation caps one task's reservation at 1 PiB, more than any process
// has, so that the sums of reservations that admission compares with
// thresholds cannot overflow int64 for thousands of running tasks.
const maxReservation = 1 << 50

// estimate returns the memory reservation of a task: the estimator's value
// or the queue's TaskMemory, capped at the queue's Memory budget so that one
// task always fits an empty queue.
func (l *Limiter) estimate(q *queueState, t *asynq.Task) int64 {
	n := q.budget.TaskMemory
	if l.estimator != nil {
		n = l.estimator(q.name, t)
	}
	n = min(max(n, 0), maxReservation)
	if q.budget.Memory > 0 {
		n = min(n, q.budget.Memory)
	}
	return n
}

// admitMemory reserves n bytes of the queue's memory budget and returns the
// number reserved, or the error that defers the task. A task on its last
// attempt waits for room instead, as it does for a concurrency slot.
func (l *Limiter) admitMemory(ctx context.Context, q *queueState, t *asynq.Task, n int64) (int64, error) {
	if q.memory == nil || n == 0 {
		return 0, nil
	}
	if q.memory.TryAcquire(n) {
		q.reserved.Add(n)
		q.metrics.memoryReserved.Add(float64(n))
		return n, nil
	}

	if l.limits.Mode == Observe {
		q.metrics.deferrals[ReasonMemory].Inc()
		l.logEvent(ctx, q, t, slog.LevelInfo, "asynqlimit: task would be deferred; observe mode runs it",
			"reason", ReasonMemory, "reservation_bytes", n, "memory_budget_bytes", q.budget.Memory)
		return 0, nil
	}
	if !lastAttempt(ctx) {
		return 0, l.deferTask(ctx, q, t, ReasonMemory)
	}

	q.metrics.waits.Inc()
	l.logWait(ctx, q, t, ReasonMemory)
	start := time.Now()
	if err := q.memory.Acquire(ctx, n); err != nil {
		l.waitEnded(ctx, q, t, ReasonMemory, time.Since(start), err)
		return 0, fmt.Errorf("asynqlimit: task waited for %d bytes of the memory budget of queue %q (%d bytes) until its context ended; "+
			"give the task more retries or a longer timeout, or raise the queue's Memory: %w", n, q.name, q.budget.Memory, err)
	}
	q.reserved.Add(n)
	q.metrics.memoryReserved.Add(float64(n))
	return n, nil
}
