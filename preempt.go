package asynqlimit

import (
	"log/slog"
	"time"
)

// track registers a running task as a candidate for preemption.
func (q *queueState) track(r *taskRun) {
	q.runsMu.Lock()
	q.runs[r] = struct{}{}
	q.runsMu.Unlock()
}

// untrack removes a task whose handler has returned.
func (q *queueState) untrack(r *taskRun) {
	q.runsMu.Lock()
	delete(q.runs, r)
	q.runsMu.Unlock()
}

// candidate returns the queue's best run to preempt: preemptible, not yet
// chosen, with the largest memory reservation and, among equals, the latest
// start, which loses the least work. The caller holds q.runsMu.
func (q *queueState) candidate() *taskRun {
	var best *taskRun
	for r := range q.runs {
		// A handler whose context has ended already, at its deadline for
		// example, and that goes on running ignores its context: ending it
		// again frees nothing.
		if !r.preemptible || r.chosen || r.ctx.Err() != nil {
			continue
		}
		if best == nil || r.grant.reservation > best.grant.reservation ||
			(r.grant.reservation == best.grant.reservation && r.start.After(best.start)) {
			best = r
		}
	}
	return best
}

// preemptOne preempts one running task: of the queues below the highest
// priority that have a candidate, the one of the lowest priority and, among
// those, the largest reservation. It reports whether it found one. Observe
// mode counts and logs the choice but leaves the task running.
func (l *Limiter) preemptOne() bool {
	var target *queueState
	var targetReservation int64
	l.eachQueue(func(q *queueState) {
		if q.budget.Priority >= l.highestPriority {
			return
		}
		q.runsMu.Lock()
		c := q.candidate()
		q.runsMu.Unlock()
		if c == nil {
			return
		}
		if target == nil || q.budget.Priority < target.budget.Priority ||
			(q.budget.Priority == target.budget.Priority && c.grant.reservation > targetReservation) {
			target, targetReservation = q, c.grant.reservation
		}
	})
	if target == nil {
		return false
	}

	// The choice is made again under the lock, because the run found above
	// may have returned and been reused since.
	target.runsMu.Lock()
	defer target.runsMu.Unlock()
	r := target.candidate()
	if r == nil {
		return false
	}
	r.chosen = true
	target.metrics.preemptions.Inc()
	l.logEvent(r.ctx, target, r.task, slog.LevelWarn, "asynqlimit: preempting task under hard memory pressure",
		"reservation_bytes", r.grant.reservation, "running_for", time.Since(r.start), "mode", l.limits.Mode.String())
	if l.limits.Mode == Enforce {
		r.preempted.Store(true)
		select {
		case r.stop <- struct{}{}:
		default: // a CPU stop is already pending
		}
	}
	return true
}

// eachQueue calls f for every queue that has had a task.
func (l *Limiter) eachQueue(f func(q *queueState)) {
	for _, q := range l.named {
		f(q)
	}
	l.unnamed.Range(func(_, v any) bool {
		f(v.(*queueState))
		return true
	})
}

// reportPreempted counts a preempted task whose handler returned and
// returns what asynq should see: nil if the handler still succeeded,
// otherwise a deferral that costs no retry.
func (l *Limiter) reportPreempted(r *taskRun, err error) error {
	if err == nil {
		r.q.metrics.outcomes[OutcomeSucceeded].Inc()
		return nil
	}
	return l.preemptDeferral(r)
}

// preemptDeferral counts a preemption and returns its deferral.
func (l *Limiter) preemptDeferral(r *taskRun) error {
	q := r.q
	q.metrics.outcomes[OutcomePreempted].Inc()
	q.metrics.deferrals[ReasonPressure].Inc()
	return &DeferError{Queue: q.name, Reason: ReasonPressure, Delay: q.deferDelay(time.Now()), issued: true}
}
