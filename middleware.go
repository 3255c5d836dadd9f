package asynqlimit

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"time"

	"github.com/hibiken/asynq"
)

// Middleware returns the asynq middleware that applies the budgets. Register
// it first with asynq.ServeMux.Use so it runs outermost, and pass the server
// config through ServerConfig so that deferrals do not spend retries.
//
// For each task it finds the queue's budget and rejects a payload over
// MaxPayload. It admits the task, or defers it when the queue is full; a task
// on its last attempt waits instead. It then runs the handler under the
// queue's Timeout. The budget stays held until the handler really returns, even when
// asynq has given up on it.
func (l *Limiter) Middleware() asynq.MiddlewareFunc {
	return func(next asynq.Handler) asynq.Handler {
		return asynq.HandlerFunc(func(ctx context.Context, t *asynq.Task) error {
			return l.handle(ctx, t, next)
		})
	}
}

func (l *Limiter) handle(ctx context.Context, t *asynq.Task, next asynq.Handler) error {
	if active, _ := ctx.Value(activeLimiterKey{}).(*Limiter); active == l {
		return l.handleNested(ctx, t, next)
	}
	// asynq starts a goroutine for each task, so these frames sit on a fresh
	// stack while the task runs. Only handle and await stay on it during the
	// wait: enter and end have frames of their own, gone or not yet there.
	// A deeper stack would make the runtime grow and copy the goroutine's
	// stack for every task.
	r, err := l.enter(ctx, t, next)
	if err != nil {
		return err
	}
	if r.inline {
		return l.runInline(r)
	}
	return l.end(r, l.await(r, ctx))
}

// handleNested runs a task that this Limiter admitted already. The same
// Limiter may run twice for one task: applied by NewServer and by mux.Use,
// or through a handler that calls the mux with its own context. Two slots
// per task could defer every task of a queue with a cap of 1, so the inner
// application lets the task through.
//
//go:noinline
func (l *Limiter) handleNested(ctx context.Context, t *asynq.Task, next asynq.Handler) error {
	l.warnNested.Do(func() {
		l.logger.Warn("asynqlimit: middleware ran inside a task it already admitted, so the inner task is not budgeted; " +
			"remove mux.Use(Middleware()) when you use NewServer, or do not call the mux from a handler")
	})
	return next.ProcessTask(ctx, t)
}

// enter checks the task's payload, admits it to its queue's budget and
// starts its handler. It returns the run, or the error that defers or
// rejects the task.
//
//go:noinline
func (l *Limiter) enter(ctx context.Context, t *asynq.Task, next asynq.Handler) (*taskRun, error) {
	name, _ := asynq.GetQueueName(ctx)
	q := l.queue(name)
	l.gate.countTask()
	g, err := l.decide(ctx, q, t)
	if err != nil {
		return nil, err
	}
	return l.start(ctx, q, t, next, g), nil
}

// decide checks the task's payload and admits it. The gate counts the task
// in transit until then, so that the task is counted there or in the slots
// held throughout. The transit ends in a deferred call, so that it also ends
// when a memory estimator panics.
func (l *Limiter) decide(ctx context.Context, q *queueState, t *asynq.Task) (grant, error) {
	defer q.gate.endTransit()
	if err := l.checkPayload(ctx, q, t); err != nil {
		return grant{}, err
	}
	return l.admit(ctx, q, t)
}

// checkPayload returns an error that makes asynq archive the task when its
// payload is over the queue's MaxPayload.
func (l *Limiter) checkPayload(ctx context.Context, q *queueState, t *asynq.Task) error {
	limit, size := q.budget.MaxPayload, len(t.Payload())
	if limit == 0 || size <= limit {
		return nil
	}

	q.metrics.rejected.Inc()
	l.logEvent(ctx, q, t, slog.LevelWarn, "asynqlimit: task rejected",
		"reason", rejectPayload, "payload_bytes", size, "max_payload_bytes", limit, "mode", l.limits.Mode.String())
	if l.limits.Mode == Observe {
		return nil
	}
	q.metrics.outcomes[OutcomeRejected].Inc()
	return fmt.Errorf("%w: the payload is %d bytes, over the MaxPayload of %d bytes of queue %q, "+
		"so the task is archived without running; shrink the payload or raise MaxPayload: %w",
		ErrPayloadTooLarge, size, limit, q.name, asynq.SkipRetry)
}

// admit returns what the task holds while it runs, or the error that defers
// it.
func (l *Limiter) admit(ctx context.Context, q *queueState, t *asynq.Task) (grant, error) {
	var g grant
	if q.memory != nil || l.monitor != nil {
		g.reservation = l.estimate(q, t)
	}
	if l.monitor != nil && l.monitor.sheds(q.budget.Priority, g.reservation) {
		if err := l.shed(ctx, q, t); err != nil {
			return grant{}, err
		}
	}
	if err := l.admitCPU(ctx, q, t); err != nil {
		return grant{}, err
	}
	slot, err := l.admitSlot(ctx, q, t)
	if err != nil {
		return grant{}, err
	}
	g.slot = slot

	if g.memory, err = l.admitMemory(ctx, q, t, g.reservation); err != nil {
		q.release(g)
		return grant{}, err
	}
	if l.monitor != nil {
		g.unseen = l.monitor.pending.add(g.reservation)
	}
	if q.cpuAccounting && q.budget.CPU > 0 {
		g.cpuEpoch = q.cpu.pending.add(1)
	}
	return g, nil
}

// admitSlot takes a concurrency slot for the task or returns the error that
// defers it. held is false for queues without a cap and for tasks that
// observe mode lets through over budget.
func (l *Limiter) admitSlot(ctx context.Context, q *queueState, t *asynq.Task) (held bool, err error) {
	if q.tryAcquire() {
		return q.slots != nil, nil
	}

	last := lastAttempt(ctx)
	switch {
	case l.limits.Mode == Observe && last:
		q.metrics.waits.Inc()
		l.logEvent(ctx, q, t, slog.LevelInfo, "asynqlimit: task would wait for room; observe mode runs it",
			"in_flight", q.inFlight.Load(), "limit", q.budget.Concurrency)
		return false, nil
	case l.limits.Mode == Observe:
		q.metrics.deferrals[ReasonConcurrency].Inc()
		l.logEvent(ctx, q, t, slog.LevelInfo, "asynqlimit: task would be deferred; observe mode runs it",
			"reason", ReasonConcurrency, "in_flight", q.inFlight.Load(), "limit", q.budget.Concurrency)
		return false, nil
	case last:
		return l.wait(ctx, q, t)
	}
	return false, l.deferTask(ctx, q, t, ReasonConcurrency)
}

// shed defers a task of a queue that process pressure sheds. In observe
// mode, and for a task on its last attempt, it only counts and logs the
// decision and returns nil.
func (l *Limiter) shed(ctx context.Context, q *queueState, t *asynq.Task) error {
	if l.limits.Mode == Enforce && !lastAttempt(ctx) {
		return l.deferTask(ctx, q, t, ReasonPressure)
	}
	cause := "it is on its last attempt"
	if l.limits.Mode == Observe {
		cause = "observe mode is on"
	}
	q.metrics.deferrals[ReasonPressure].Inc()
	l.logEvent(ctx, q, t, slog.LevelInfo, "asynqlimit: task would be shed by process pressure; it runs because "+cause,
		"reason", ReasonPressure, "priority", q.budget.Priority)
	return nil
}

// lastAttempt reports whether asynq would archive the task on any error, as
// it does once Retried >= MaxRetry. A context without asynq's task metadata
// counts as a last attempt, so a deferral can never lose such a task either.
func lastAttempt(ctx context.Context) bool {
	retried, ok := asynq.GetRetryCount(ctx)
	if !ok {
		return true
	}
	maxRetry, ok := asynq.GetMaxRetry(ctx)
	return !ok || retried >= maxRetry
}

// wait blocks until the queue has room or ctx ends. Tasks that wait are
// admitted in arrival order, before any task that arrives after them.
func (l *Limiter) wait(ctx context.Context, q *queueState, t *asynq.Task) (bool, error) {
	q.metrics.waits.Inc()
	l.logWait(ctx, q, t, ReasonConcurrency)

	start := time.Now()
	if err := q.slots.Acquire(ctx, 1); err != nil {
		waited := time.Since(start)
		l.waitEnded(ctx, q, t, ReasonConcurrency, waited, err)
		return false, fmt.Errorf("asynqlimit: task waited %s for room on queue %q (concurrency %d) until its context ended; "+
			"give the task more retries or a longer timeout, or raise the queue's Concurrency: %w",
			waited.Round(time.Millisecond), q.name, q.budget.Concurrency, err)
	}
	q.slotsHeld.Add(1)
	q.fullSince.Store(0)
	return true, nil
}

// waitEnded counts and logs a wait that the task's context ended. A deadline
// means asynq archives the task, as it archives any last-attempt task that
// times out: running it over the cap would break the budget instead. A
// cancellation comes from asynq's shutdown, which puts the task back, or from
// CancelProcessing, so it is logged without blame and not counted.
func (l *Limiter) waitEnded(ctx context.Context, q *queueState, t *asynq.Task, reason Reason, waited time.Duration, err error) {
	if !errors.Is(err, context.DeadlineExceeded) {
		l.logEvent(ctx, q, t, slog.LevelInfo, "asynqlimit: task's context was canceled while it waited for room",
			"reason", reason, "waited", waited, "error", err)
		return
	}
	q.metrics.outcomes[OutcomeTimedOut].Inc()
	attrs := append([]any{"reason", reason, "waited", waited, "error", err}, l.gateNumbers(q, reason)...)
	l.logEvent(ctx, q, t, slog.LevelError,
		"asynqlimit: task's deadline passed while it waited for room; asynq archives it because it is on its last attempt", attrs...)
}

// logWait logs that a task on its last attempt waits for room, with the
// numbers of the budget it waits for.
func (l *Limiter) logWait(ctx context.Context, q *queueState, t *asynq.Task, reason Reason) {
	if l.logger.Enabled(ctx, slog.LevelInfo) {
		attrs := append([]any{"reason", reason}, l.gateNumbers(q, reason)...)
		l.logEvent(ctx, q, t, slog.LevelInfo, "asynqlimit: task waits for room because it is on its last attempt", attrs...)
	}
}

// deferTask counts and logs a deferral and returns the *DeferError that
// makes asynq retry the task later without spending a retry.
func (l *Limiter) deferTask(ctx context.Context, q *queueState, t *asynq.Task, reason Reason) error {
	delay := q.deferDelay(time.Now())
	q.metrics.deferrals[reason].Inc()
	q.metrics.outcomes[OutcomeDeferred].Inc()
	if l.logger.Enabled(ctx, slog.LevelInfo) {
		attrs := append([]any{"reason", reason, "delay", delay}, l.gateNumbers(q, reason)...)
		l.logEvent(ctx, q, t, slog.LevelInfo, "asynqlimit: task deferred", attrs...)
	}
	return &DeferError{Queue: q.name, Reason: reason, Delay: delay, issued: true}
}

// logEvent logs one enforcement event of a task unless the queue's log rate
// is used up. The next line written counts the lines held back. It never
// logs the payload.
func (l *Limiter) logEvent(ctx context.Context, q *queueState, t *asynq.Task, level slog.Level, msg string, attrs ...any) {
	if !l.logger.Enabled(ctx, level) {
		return
	}
	class := 0
	if level >= slog.LevelWarn {
		class = 1
	}
	if !q.logs[class].Allow() {
		q.suppressed[class].Add(1)
		return
	}

	id, _ := asynq.GetTaskID(ctx)
	args := make([]any, 0, len(attrs)+8)
	args = append(args, "queue", q.name, "task_id", id, "task_type", t.Type())
	args = append(args, attrs...)
	if n := q.suppressed[class].Swap(0); n > 0 {
		args = append(args, "suppressed", n)
	}
	l.logger.Log(ctx, level, msg, args...)
}
