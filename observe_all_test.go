package asynqlimit

import (
	"context"
	"testing"
	"time"

	"github.com/hibiken/asynq"
)

// Observe mode with every budget and both pressure levels breached runs
// every task to completion, defers nothing and spends no retry.
func TestObserveChangesNothing(t *testing.T) {
	skipWithoutThreadCPU(t)
	sampler := &fakeSampler{}
	sampler.set(500, nil) // over the hard threshold from the start
	limits := Limits{
		Mode: Observe,
		Queues: map[string]Budget{
			"low": fastDefer(Budget{
				Concurrency: 1, Timeout: 50 * time.Millisecond, MaxPayload: 4,
				Memory: 10, TaskMemory: 10, CPU: 0.01, TaskCPU: 10 * time.Millisecond,
			}),
			"high": {Priority: 1},
		},
		Process: ProcessLimits{MemorySoft: 100, MemoryHard: 200, Grace: time.Nanosecond},
	}
	h := newHarness(t, limits, asynq.Config{Concurrency: 4, Queues: map[string]int{"low": 1, "high": 1}},
		WithSampler(sampler), WithSampleInterval(10*time.Millisecond), withDetectedLimits(testDetected))

	const n = 6
	ids := make([]string, 0, n)
	for i := range n {
		retries := asynq.MaxRetry(3)
		if i%2 == 0 {
			retries = asynq.MaxRetry(0)
		}
		ids = append(ids, h.enqueue("low", "spin", []byte("oversized payload"), retries).ID)
	}
	h.start(asynq.HandlerFunc(func(ctx context.Context, _ *asynq.Task) error {
		return spin(ctx, 150*time.Millisecond)
	}))
	info := h.waitSettled("low", 15*time.Second)
	if info.Completed != n || info.Archived != 0 {
		t.Errorf("observe mode: %s; want all %d completed", queueCounts(info), n)
	}
	for _, id := range ids {
		if got := h.taskInfo("low", id); got.Retried != 0 || got.LastErr != "" {
			t.Errorf("task %s: Retried %d, last error %q; want 0 and none", id, got.Retried, got.LastErr)
		}
	}
	for _, o := range []Outcome{OutcomeDeferred, OutcomeTimedOut, OutcomePreempted, OutcomeFailed, OutcomeRejected} {
		if got := h.outcome("low", o); got != 0 {
			t.Errorf("tasks_total{low,%s} = %v in observe mode, want 0", o, got)
		}
	}
	// Every decision was still made and counted.
	for _, r := range []Reason{ReasonPressure, ReasonConcurrency, ReasonMemory} {
		if got := h.deferrals("low", r); got == 0 {
			t.Errorf("deferrals{low,%s} = 0 in observe mode, want the decision counted", r)
		}
	}
}
