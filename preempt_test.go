package asynqlimit

import (
	"context"
	"sync/atomic"
	"testing"
	"time"

	"github.com/hibiken/asynq"
	"github.com/prometheus/client_golang/prometheus/testutil"
)

// trackedRun registers a fake running task in queue, as the middleware
// does, and returns it.
func trackedRun(l *Limiter, queue string, reservation int64, preemptible bool, start time.Time) *taskRun {
	q := l.queue(queue)
	r := l.newRun(q, asynq.NewTask("t", nil), nil, grant{reservation: reservation}, start)
	r.ctx = newRunCtx(context.Background(), l, time.Time{}, false)
	r.preemptible = preemptible
	q.track(r)
	return r
}

func TestPreemptOrder(t *testing.T) {
	l, _, _ := newMonitoredLimiter(t, threeQueues(ProcessLimits{MemoryHard: 100}))
	start := time.Unix(1000, 0)
	lowSmall := trackedRun(l, "low", 10, true, start)
	lowLarge := trackedRun(l, "low", 50, true, start)
	lowLast := trackedRun(l, "low", 90, false, start) // last attempt: never preempted
	mid := trackedRun(l, "mid", 80, true, start)
	high := trackedRun(l, "high", 99, true, start)

	want := []*taskRun{lowLarge, lowSmall, mid}
	for i, w := range want {
		if !l.preemptOne() {
			t.Fatalf("step %d: preemptOne() = false, want a task preempted", i)
		}
		if !w.preempted.Load() {
			t.Fatalf("step %d: the expected run (queue %s, reservation %d) was not preempted", i, w.q.name, w.grant.reservation)
		}
		select {
		case <-w.stop:
		default:
			t.Errorf("step %d: no preempt signal sent", i)
		}
	}
	if l.preemptOne() {
		t.Errorf("preemptOne() = true with only a last attempt and the highest priority left, want false")
	}
	if lowLast.preempted.Load() || high.preempted.Load() {
		t.Errorf("preempted a last attempt (%v) or the highest priority (%v), want neither",
			lowLast.preempted.Load(), high.preempted.Load())
	}
	if got := testutil.ToFloat64(l.metrics.preemptions.WithLabelValues("low")); got != 2 {
		t.Errorf("preemptions_total{low} = %v, want 2", got)
	}
}

func TestPreemptObserveMode(t *testing.T) {
	limits := threeQueues(ProcessLimits{MemoryHard: 100})
	limits.Mode = Observe
	l, _, _ := newMonitoredLimiter(t, limits)
	r := trackedRun(l, "low", 10, true, time.Now())

	if !l.preemptOne() {
		t.Fatal("preemptOne() = false, want the choice counted")
	}
	if r.preempted.Load() {
		t.Errorf("observe mode preempted the run, want it left running")
	}
	if l.preemptOne() {
		t.Errorf("second preemptOne() = true, want each run counted once")
	}
	if got := testutil.ToFloat64(l.metrics.preemptions.WithLabelValues("low")); got != 1 {
		t.Errorf("preemptions_total{low} = %v, want 1", got)
	}
}

func TestHardPressurePreemptsAndRetries(t *testing.T) {
	sampler := &fakeSampler{}
	sampler.set(0, nil)
	h := newHarness(t, threeQueues(ProcessLimits{MemoryHard: 100}), asynq.Config{
		Concurrency: 4,
		Queues:      map[string]int{"low": 1, "high": 1},
	}, WithSampler(sampler), WithSampleInterval(20*time.Millisecond), withDetectedLimits(testDetected))

	var lowRuns atomic.Int64
	lowStarted := make(chan struct{}, 4)
	mux := asynq.NewServeMux()
	mux.HandleFunc("hold", func(ctx context.Context, _ *asynq.Task) error {
		if lowRuns.Add(1) > 1 {
			return nil // the retry after the preemption completes
		}
		lowStarted <- struct{}{}
		<-ctx.Done()
		return ctx.Err()
	})
	mux.HandleFunc("quick", func(context.Context, *asynq.Task) error { return nil })
	low := h.enqueue("low", "hold", nil, asynq.MaxRetry(3))
	h.start(mux)
	<-lowStarted

	sampler.set(500, nil) // hard memory pressure
	waitFor(t, 10*time.Second, func() bool { return h.outcome("low", OutcomePreempted) == 1 },
		func() string { return "the low-priority task was not preempted" })
	high := h.enqueue("high", "quick", nil, asynq.MaxRetry(3))
	waitFor(t, 10*time.Second, func() bool { return h.taskInfo("high", high.ID).State == asynq.TaskStateCompleted },
		func() string { return "the high-priority task did not complete under hard pressure" })

	sampler.set(10, nil)
	waitFor(t, 20*time.Second, func() bool { return h.taskInfo("low", low.ID).State == asynq.TaskStateCompleted },
		func() string { return "the preempted task did not complete after pressure ended" })
	if got := h.taskInfo("low", low.ID).Retried; got != 0 {
		t.Errorf("preempted task Retried = %d, want 0", got)
	}
	if got := lowRuns.Load(); got != 2 {
		t.Errorf("low handler ran %d times, want 2 (preempted, then completed)", got)
	}
}

func TestPreemptStopsWhenMemoryFalls(t *testing.T) {
	l, _, _ := newMonitoredLimiter(t, threeQueues(ProcessLimits{MemoryHard: 100, Grace: time.Second}))
	runs := make([]*taskRun, 3)
	for i := range runs {
		runs[i] = trackedRun(l, "low", 10, true, time.Unix(1000, int64(i)))
	}
	now := time.Unix(2000, 0)
	l.monitor.step(ResourceSample{RSS: 150}, nil, now) // over hard: one preemption
	for range 3 {
		now = now.Add(100 * time.Millisecond)
		l.monitor.step(ResourceSample{RSS: 50}, nil, now) // still hard within the grace, but below the threshold
	}

	preempted := 0
	for _, r := range runs {
		if r.preempted.Load() {
			preempted++
		}
	}
	if preempted != 1 {
		t.Errorf("preempted %d runs, want 1: samples below the hard threshold must not preempt", preempted)
	}
}
