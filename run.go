package asynqlimit

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"runtime"
	"runtime/debug"
	"strings"
	"sync/atomic"
	"time"

	"github.com/hibiken/asynq"

	"github.com/asynqlimit/asynqlimit/internal/threadcpu"
)

// The states of a taskRun. The handler goroutine moves running to finished
// when it returns in time; the middleware moves running to abandoned when it
// stops waiting. Whichever swap succeeds decides who reports the result.
const (
	runRunning int32 = iota
	runFinished
	runAbandoned
)

// taskRun is one handler call, run in its own goroutine so the middleware
// can return at the deadline while a handler that ignores its context goes
// on, still holding its budget.
type taskRun struct {
	l     *Limiter
	q     *queueState
	task  *asynq.Task
	next  asynq.Handler
	ctx   *runCtx
	grant grant
	start time.Time
	state atomic.Int32
	// done receives a signal when the handler has returned and result holds
	// what it returned. A signal of its own, rather than the result on the
	// channel, keeps the receive small on the middleware's stack.
	done   chan struct{}
	result runResult
	// timer fires at the budget's deadline and then after the grace period.
	// It stays with the run when the run is recycled. expired is its channel
	// while the budget's deadline applies, nil otherwise.
	timer   *time.Timer
	expired <-chan time.Time
	// stop receives a signal when hard memory pressure preempts the run or
	// the run exceeds its CPU time. preempted and overCPU record which. A run
	// on its last attempt is not preemptible, because asynq would archive it.
	stop        chan struct{}
	preempted   atomic.Bool
	preemptible bool
	// overCPU records that the task used more than its TaskCPU, and
	// timeoutCounted that timeouts_total counted the run.
	overCPU        atomic.Bool
	timeoutCounted atomic.Bool
	// thread is the OS thread the handler is locked to while hasThread;
	// both are guarded by the queue's runsMu.
	thread    threadcpu.Thread
	hasThread bool
	// cpuSampled is the CPU time of the task at the last sample that read
	// it, guarded by the queue's runsMu.
	cpuSampled time.Duration
	// chosen is true once preemption picked the run, in either mode, so that
	// observe mode counts each run once.
	chosen bool
	// inline is true when the handler runs in the middleware's goroutine.
	// endedSeen is when a CPU sample first saw the context of such a run
	// ended, guarded by the queue's runsMu.
	inline    bool
	endedSeen time.Time
}

type runResult struct {
	err      error
	panicked bool
	panicVal any
	stack    []byte
}

// start sets up the run of a task and starts its handler.
func (l *Limiter) start(ctx context.Context, q *queueState, t *asynq.Task, next asynq.Handler, g grant) *taskRun {
	start := time.Now()
	deadline, ok := budgetDeadline(ctx, start, q.budget.Timeout)
	if l.limits.Mode == Observe {
		ok = false // report counts the timeout instead
	}
	r := l.newRun(q, t, next, g, start)
	r.ctx = newRunCtx(ctx, l, deadline, ok)
	r.expired = nil
	if ok {
		r.timer.Reset(deadline.Sub(start))
		r.expired = r.timer.C
	}

	r.preemptible = q.tracked && l.tracksRuns && !lastAttempt(ctx)
	r.inline = l.runsInline(q, r, ok)
	r.ctx.followsParent = r.inline

	l.running.Add(1)
	q.inFlight.Add(1)
	q.metrics.inFlight.Inc()
	// Tracking makes the run visible to other goroutines, so it comes once
	// the run is set up.
	if q.tracked && !q.cpuAccounting { // lockThread tracks the run with its thread
		q.track(r)
	}
	if !r.inline {
		go r.execute()
	}
	return r
}

// runsInline reports whether the handler of r can run in the middleware's
// goroutine rather than in one of its own. The budget's deadline, TaskCPU
// and preemption need a goroutine of its own, because only then can the
// middleware return before a handler that ignores its context. Without them,
// asynq's deadline ends the task either way. Handing the task to another
// goroutine and back wakes an idle processor twice, which costs more than
// the CPU accounting itself. Only queues that account CPU run inline,
// because the CPU samples, which read every running task, are what notice a
// handler that outlives its context there.
func (l *Limiter) runsInline(q *queueState, r *taskRun, deadline bool) bool {
	if !q.cpuAccounting || deadline {
		return false
	}
	if l.limits.Mode == Observe { // observe mode ends no task's context
		return true
	}
	return q.budget.TaskCPU == 0 && !(r.preemptible && q.budget.Priority < l.highestPriority)
}

// runInline calls the handler of r in the middleware's goroutine and
// reports its result. A handler that calls runtime.Goexit ends this
// goroutine too, after execute released its budget, and asynq fails the
// task at its deadline, as it would without the middleware.
func (l *Limiter) runInline(r *taskRun) error {
	r.execute()
	if r.state.Load() == runAbandoned {
		return abandonError(r)
	}
	return l.end(r, true)
}

// end reports the result of a run that await returned.
//
//go:noinline
func (l *Limiter) end(r *taskRun, finished bool) error {
	if !finished {
		return l.abandon(r)
	}
	res := r.result
	r.timer.Stop()
	// Like the cancel function of context.WithDeadline: whatever the handler
	// left running on its context stops when the task ends.
	r.ctx.cancel(context.Canceled)

	q := r.q
	if res.panicked {
		// Panicking again lets asynq's own recovery record the panic.
		q.metrics.outcomes[OutcomeFailed].Inc()
		l.recycle(r)
		panic(res.panicVal)
	}
	var err error
	switch {
	case r.preempted.Load():
		err = l.reportPreempted(r, res.err)
	case r.overCPU.Load() && l.limits.Mode == Enforce && res.err != nil:
		q.metrics.outcomes[OutcomeTimedOut].Inc()
		err = overCPUError(q)
	default:
		err = l.report(r, res.err)
	}
	l.recycle(r)
	return err
}

// await waits for the handler to return, or for its deadline, the end of
// the task's context or a preemption, after which it ends the handler's
// context and gives it the grace period. finished is false when the handler
// was marked abandoned.
func (l *Limiter) await(r *taskRun, parent context.Context) (finished bool) {
	// A nil channel costs the select nothing, and only tracked runs can be
	// stopped.
	var stop chan struct{}
	if r.q.tracked {
		stop = r.stop
	}
	var cause error
	select {
	case <-r.done:
		return true
	case <-r.expired:
		cause = errBudgetTimeout
	case <-parent.Done():
		cause = parent.Err()
	case <-stop:
		cause = context.Canceled
		if r.overCPU.Load() {
			cause = context.DeadlineExceeded
		}
	}
	return l.interrupt(r, cause)
}

// interrupt ends the handler's context with cause and gives the handler the
// grace period. It is apart from await so that its frame is not on the stack
// while await waits.
//
//go:noinline
func (l *Limiter) interrupt(r *taskRun, cause error) (finished bool) {
	if cause == errBudgetTimeout {
		r.countTimeout()
		cause = context.DeadlineExceeded
	}
	r.ctx.cancel(cause)
	return r.awaitGrace(l.abandonGrace)
}

// countTimeout counts the run in timeouts_total, once: a run can reach its
// Timeout and its TaskCPU both, and the two are seen by different
// goroutines.
func (r *taskRun) countTimeout() {
	if r.timeoutCounted.CompareAndSwap(false, true) {
		r.q.metrics.timeouts.Inc()
	}
}

// errBudgetTimeout is the cause that await passes to interrupt when the
// budget's timeout ended the wait. interrupt counts the timeout and ends the
// handler's context with context.DeadlineExceeded instead.
var errBudgetTimeout = errors.New("asynqlimit: budget timeout")

// budgetDeadline returns start + timeout, and whether it is earlier than the
// deadline of ctx. A zero timeout sets no deadline.
func budgetDeadline(ctx context.Context, start time.Time, timeout time.Duration) (time.Time, bool) {
	if timeout <= 0 {
		return time.Time{}, false
	}
	deadline := start.Add(timeout)
	if d, ok := ctx.Deadline(); ok && !deadline.Before(d) {
		return time.Time{}, false
	}
	return deadline, true
}

func (l *Limiter) newRun(q *queueState, t *asynq.Task, next asynq.Handler, g grant, start time.Time) *taskRun {
	r, _ := l.runs.Get().(*taskRun)
	if r == nil {
		r = &taskRun{l: l, done: make(chan struct{}, 1), timer: time.NewTimer(time.Hour), stop: make(chan struct{}, 1)}
		r.timer.Stop()
	}
	select {
	case <-r.stop: // a signal that came after the last handler returned
	default:
	}
	r.preempted.Store(false)
	r.overCPU.Store(false)
	r.timeoutCounted.Store(false)
	r.chosen, r.endedSeen = false, time.Time{}
	r.q, r.task, r.next, r.grant, r.start = q, t, next, g, start
	r.state.Store(runRunning)
	return r
}

// recycle returns a run whose handler returned in time to the pool. An
// abandoned run is never recycled, because its goroutine still uses it.
func (l *Limiter) recycle(r *taskRun) {
	r.q, r.task, r.next, r.ctx, r.result = nil, nil, nil, nil, runResult{}
	l.runs.Put(r)
}

// execute calls the handler, releases the budget, and hands the result to
// the middleware, or logs it when the middleware has given up on it.
func (r *taskRun) execute() {
	// A handler that calls runtime.Goexit never returns, but deferred calls
	// still run, so the budget is released and the task fails with errGoexit.
	res := runResult{err: errGoexit}
	r.lockThread()
	defer func() {
		r.unlockThread()
		elapsed := time.Since(r.start)
		if r.q.tracked && !r.q.cpuAccounting {
			r.q.untrack(r)
		}
		r.q.finish(r.grant, elapsed)
		if m := r.l.monitor; m != nil {
			m.pending.done(r.grant.unseen)
		}
		r.l.running.Add(-1)
		if res.err == errGoexit {
			r.logGoexit()
		}
		r.result = res
		if r.state.CompareAndSwap(runRunning, runFinished) {
			switch {
			case !r.inline:
				r.done <- struct{}{}
			case res.err == errGoexit:
				// runInline never gets to end the context or report the
				// outcome: the goroutine ends after this deferred call.
				r.ctx.cancel(context.Canceled)
				r.q.metrics.outcomes[OutcomeFailed].Inc()
			}
			return
		}
		r.l.abandonedReturned(r, res, elapsed)
	}()
	res = r.call()
}

// logGoexit logs a handler that called runtime.Goexit.
//
//go:noinline
func (r *taskRun) logGoexit() {
	msg := "asynqlimit: handler called runtime.Goexit; the task fails"
	if r.inline {
		msg = "asynqlimit: handler called runtime.Goexit; asynq fails the task at its deadline"
	}
	r.l.logEvent(r.ctx, r.q, r.task, slog.LevelError, msg)
}

// errGoexit is the result of a handler that called runtime.Goexit.
var errGoexit = errors.New("asynqlimit: handler called runtime.Goexit instead of returning; return an error to fail the task")

// call runs the handler and turns a panic into a result, because a panic in
// this goroutine would escape asynq's recovery and end the process.
func (r *taskRun) call() (res runResult) {
	defer func() {
		if v := recover(); v != nil {
			where := panicLocation()
			res = runResult{err: fmt.Errorf("asynqlimit: handler panicked at %s: %v", where, v),
				panicked: true, panicVal: withLocation(v, where), stack: debug.Stack()}
			r.l.logEvent(r.ctx, r.q, r.task, slog.LevelError, "asynqlimit: handler panicked",
				"panic", fmt.Sprint(v), "location", where, "stack", string(res.stack))
		}
	}()
	return runResult{err: r.next.ProcessTask(r.ctx, r.task)}
}

// panicLocation returns file:line of the code that panicked, called from the
// deferred function that recovered. It skips the runtime's own frames, as
// asynq does, so a nil map write points at the handler, not at the runtime.
func panicLocation() string {
	pcs := make([]uintptr, 32)
	frames := runtime.CallersFrames(pcs[:runtime.Callers(1, pcs)])
	afterPanic := false
	for {
		f, more := frames.Next()
		switch {
		case f.Function == "runtime.gopanic":
			afterPanic = true
		case afterPanic && !strings.HasPrefix(f.Function, "runtime."):
			return fmt.Sprintf("%s:%d", f.File, f.Line)
		}
		if !more {
			return "unknown location"
		}
	}
}

// withLocation returns the value to panic with again, so that asynq, which
// records where it recovered the panic (in this package), also records where
// the handler panicked.
func withLocation(v any, where string) error {
	if err, ok := v.(error); ok {
		return fmt.Errorf("%w [handler panicked at %s]", err, where)
	}
	return fmt.Errorf("%v [handler panicked at %s]", v, where)
}

// awaitGrace gives a handler whose context has ended a moment to return.
// finished is false when the handler was marked abandoned.
func (r *taskRun) awaitGrace(grace time.Duration) (finished bool) {
	if grace > 0 {
		r.timer.Reset(grace)
		select {
		case <-r.done:
			return true
		case <-r.timer.C:
		}
	}
	// Counted before the swap, so that a handler returning right after it
	// never takes the gauge below zero.
	r.q.metrics.abandoned.Inc()
	if r.state.CompareAndSwap(runRunning, runAbandoned) {
		return false
	}
	r.q.metrics.abandoned.Dec()
	<-r.done
	return true
}

// report counts and logs the outcome of a handler that returned in time and
// returns its error unchanged. A handler that returned nil after asynq's
// context ended counts as asynq treats it: timed out or failed.
func (l *Limiter) report(r *taskRun, err error) error {
	q, elapsed := r.q, time.Since(r.start)
	counted := err
	if err == nil {
		// asynq stops waiting when its context ends and fails the task with
		// the context's error, so a nil returned after that is no success.
		counted = r.ctx.Context.Err()
	}
	outcome := outcomeOf(counted, r.ctx.Err())
	q.metrics.outcomes[outcome].Inc()
	switch {
	case outcome == OutcomeTimedOut:
		l.logEvent(r.ctx, q, r.task, slog.LevelWarn, "asynqlimit: task timed out",
			"elapsed", elapsed, "timeout", r.timeout(), "error", counted)
	case l.limits.Mode == Observe && q.budget.Timeout > 0 && elapsed > q.budget.Timeout:
		r.countTimeout()
		l.logEvent(r.ctx, q, r.task, slog.LevelWarn, "asynqlimit: task ran past its queue's Timeout; observe mode let it run",
			"elapsed", elapsed, "timeout", q.budget.Timeout)
	}
	return err
}

// outcomeOf classifies a handler error given the error of its context.
func outcomeOf(err, ctxErr error) Outcome {
	switch {
	case err == nil:
		return OutcomeSucceeded
	case errors.Is(ctxErr, context.DeadlineExceeded):
		return OutcomeTimedOut
	default:
		return OutcomeFailed
	}
}

// abandon counts a handler that is still running after its context ended
// and returns the error that lets asynq move on. The handler keeps its
// budget until it returns.
func (l *Limiter) abandon(r *taskRun) error {
	l.logAbandoned(r)
	if r.preempted.Load() {
		return l.preemptDeferral(r)
	}
	ctxErr := r.ctx.Err()
	r.q.metrics.outcomes[outcomeOf(ctxErr, ctxErr)].Inc()
	return abandonError(r)
}

// logAbandoned logs a handler that is still running after its context
// ended.
func (l *Limiter) logAbandoned(r *taskRun) {
	l.logEvent(r.ctx, r.q, r.task, slog.LevelWarn,
		"asynqlimit: handler ignores its context and is still running; its budget stays held until it returns",
		"elapsed", time.Since(r.start), "timeout", r.timeout(), "error", r.ctx.Err())
}

// timeout returns the time from the start of the run to the deadline of its
// context: the queue's Timeout, or asynq's deadline when that comes first.
// It is 0 for a context without a deadline.
func (r *taskRun) timeout() time.Duration {
	if deadline, ok := r.ctx.Deadline(); ok {
		return deadline.Sub(r.start).Round(time.Millisecond)
	}
	return 0
}

// abandonError returns the error of a task whose handler was abandoned.
func abandonError(r *taskRun) error {
	q, ctxErr, elapsed := r.q, r.ctx.Err(), time.Since(r.start)
	if r.overCPU.Load() {
		return overCPUError(q)
	}
	if errors.Is(ctxErr, context.DeadlineExceeded) {
		return fmt.Errorf("%w: handler on queue %q still running %s after it started; make the handler return when its context ends: %w",
			ErrTimedOut, q.name, elapsed.Round(time.Millisecond), ctxErr)
	}
	return fmt.Errorf("asynqlimit: handler on queue %q still running after its context was canceled: %w", q.name, ctxErr)
}

// abandonedReturned accounts for an abandoned handler that has returned at
// last.
func (l *Limiter) abandonedReturned(r *taskRun, res runResult, elapsed time.Duration) {
	r.q.metrics.abandoned.Dec()
	l.logEvent(r.ctx, r.q, r.task, slog.LevelInfo, "asynqlimit: abandoned handler returned",
		"elapsed", elapsed, "error", res.err)
}

// finish releases what a run held and records its wall time.
func (q *queueState) finish(g grant, elapsed time.Duration) {
	q.metrics.duration.Observe(elapsed.Seconds())
	q.inFlight.Add(-1)
	q.metrics.inFlight.Dec()
	q.release(g)
}
