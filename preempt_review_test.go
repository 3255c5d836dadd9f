package asynqlimit

import (
	"context"
	"sync/atomic"
	"testing"
	"time"

	"github.com/hibiken/asynq"
	"github.com/prometheus/client_golang/prometheus/testutil"
)

// A handler whose context has ended and that goes on running ignores its
// context: preempting it frees nothing, so preemption picks a task whose
// context is still live, even with a smaller reservation.
func TestPreemptSkipsEndedContext(t *testing.T) {
	l, _, _ := newMonitoredLimiter(t, threeQueues(ProcessLimits{MemoryHard: 100}))
	start := time.Now()
	// The abandoned handler: its budget Timeout ended its context, and it
	// goes on running with its reservation held.
	abandoned := trackedRun(l, "low", 200, true, start)
	abandoned.ctx.cancel(context.DeadlineExceeded)
	abandoned.state.Store(runAbandoned)
	live := trackedRun(l, "low", 100, true, start.Add(time.Millisecond))

	if !l.preemptOne() {
		t.Fatal("preemptOne() = false with a live preemptible task in queue low")
	}
	if !live.preempted.Load() {
		t.Errorf("the first preemption under hard pressure went to the handler whose context had already ended "+
			"(preempted: %v), not to the running task that honours its context", abandoned.preempted.Load())
	}
	if got := testutil.ToFloat64(l.metrics.preemptions.WithLabelValues("low")); got != 1 {
		t.Errorf("preemptions_total{low} = %v, want 1", got)
	}
}

// Hard memory pressure over handlers that ignore their context loses no
// task and spends no retry, and last attempts are never preempted.
func TestPreemptLosesNoTask(t *testing.T) {
	sampler := &fakeSampler{}
	sampler.set(0, nil)
	limits := threeQueues(ProcessLimits{MemorySoft: 100, MemoryHard: 200, Grace: time.Nanosecond})
	limits.Queues["low"] = fastDefer(Budget{TaskMemory: 10})
	h := newHarness(t, limits, asynq.Config{Concurrency: 6, Queues: map[string]int{"low": 1, "high": 1}},
		WithSampler(sampler), WithSampleInterval(20*time.Millisecond), withDetectedLimits(testDetected))

	var started atomic.Int64
	h.start(asynq.HandlerFunc(func(ctx context.Context, _ *asynq.Task) error {
		started.Add(1)
		time.Sleep(400 * time.Millisecond) // ignores ctx
		return nil
	}))
	last := make(map[string]bool)
	for i := range 4 {
		opt := asynq.MaxRetry(3)
		if i%2 == 1 {
			opt = asynq.MaxRetry(0)
		}
		last[h.enqueue("low", "ignore", nil, opt).ID] = i%2 == 1
	}
	waitFor(t, 5*time.Second, func() bool { return started.Load() >= 4 },
		func() string { return "the tasks did not start" })
	sampler.set(500, nil)
	waitFor(t, 5*time.Second, func() bool { return h.outcome("low", OutcomePreempted) >= 2 },
		func() string { return "the two preemptible tasks were not preempted" })
	time.Sleep(300 * time.Millisecond)
	sampler.set(10, nil)

	info := h.waitSettled("low", 20*time.Second)
	if info.Completed != 4 || info.Archived != 0 {
		t.Errorf("after preempting handlers that ignore their context: %s; want 4 completed", queueCounts(info))
	}
	for id := range last {
		if got := h.taskInfo("low", id).Retried; got != 0 {
			t.Errorf("task %s Retried = %d, want 0", id, got)
		}
	}
	if got := h.outcome("low", OutcomePreempted); got != 2 {
		t.Errorf("tasks_total{low,preempted} = %v, want 2: last attempts are never preempted", got)
	}
}
