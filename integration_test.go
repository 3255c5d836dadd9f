package asynqlimit

import (
	"context"
	"errors"
	"runtime"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/hibiken/asynq"
	"github.com/prometheus/client_golang/prometheus/testutil"
)

// fastDefer makes deferred tasks return quickly, for tests.
func fastDefer(b Budget) Budget {
	b.DeferDelay, b.MaxDeferDelay = 50*time.Millisecond, 300*time.Millisecond
	return b
}

func TestConcurrencyCapUnderLoad(t *testing.T) {
	caps := map[string]int{"a": 1, "b": 2, "c": 3}
	limits := Limits{Queues: map[string]Budget{}}
	for q, n := range caps {
		limits.Queues[q] = fastDefer(Budget{Concurrency: n})
	}
	var userErrors atomic.Int64
	h := newHarness(t, limits, asynq.Config{
		Concurrency: 12,
		Queues:      map[string]int{"a": 1, "b": 1, "c": 1},
		ErrorHandler: asynq.ErrorHandlerFunc(func(context.Context, *asynq.Task, error) {
			userErrors.Add(1)
		}),
	}, WithoutGate()) // the test needs deferrals, which the gate avoids
	const total = 200
	for i := range total {
		q := []string{"a", "b", "c"}[i%3]
		h.enqueue(q, "sleep", nil, asynq.MaxRetry(3))
	}
	peaks := newPeakTracker()
	h.start(peaks.handler(5 * time.Millisecond))

	completed := 0
	for q, limit := range caps {
		info := h.waitSettled(q, 60*time.Second)
		completed += info.Completed
		if info.Archived != 0 {
			t.Errorf("queue %s: %d tasks archived, want 0", q, info.Archived)
		}
		peak, runs := peaks.get(q)
		if peak > limit {
			t.Errorf("queue %s: peak in flight = %d, want <= %d", q, peak, limit)
		}
		if runs != info.Completed {
			t.Errorf("queue %s: handler ran %d times, want once per task (%d)", q, runs, info.Completed)
		}
	}
	if completed != total {
		t.Errorf("completed tasks = %d, want %d", completed, total)
	}
	if got := h.deferrals("a", ReasonConcurrency); got == 0 {
		t.Errorf("deferrals of queue a = 0, want > 0: the test did not saturate the queue")
	}
	if got := userErrors.Load(); got != 0 {
		t.Errorf("user ErrorHandler called %d times, want 0: deferrals must not reach it", got)
	}
}

func TestDeferralKeepsRetryCount(t *testing.T) {
	var isFailureCalls atomic.Int64
	h := newHarness(t, Limits{Queues: map[string]Budget{"q": fastDefer(Budget{Concurrency: 1})}}, asynq.Config{
		Concurrency: 4,
		Queues:      map[string]int{"q": 1},
		IsFailure: func(error) bool {
			isFailureCalls.Add(1)
			return true
		},
	}, WithoutGate()) // the test needs deferrals, which the gate avoids
	slow := h.enqueue("q", "slow", nil, asynq.MaxRetry(0))
	deferred := make([]*asynq.TaskInfo, 3)
	for i := range deferred {
		deferred[i] = h.enqueue("q", "quick", nil, asynq.MaxRetry(1))
	}
	started := make(chan struct{})
	mux := asynq.NewServeMux()
	mux.HandleFunc("slow", func(context.Context, *asynq.Task) error {
		close(started)
		time.Sleep(time.Second)
		return nil
	})
	mux.HandleFunc("quick", func(context.Context, *asynq.Task) error { return nil })
	h.start(mux)

	h.waitSettled("q", 20*time.Second)
	if got := h.taskInfo("q", slow.ID).State; got != asynq.TaskStateCompleted {
		t.Errorf("slow task state = %v, want completed", got)
	}
	for _, ti := range deferred {
		info := h.taskInfo("q", ti.ID)
		if info.State != asynq.TaskStateCompleted {
			t.Errorf("task %s state = %v, want completed", ti.ID, info.State)
		}
		if info.Retried != 0 {
			t.Errorf("task %s Retried = %d, want 0 after deferrals", ti.ID, info.Retried)
		}
	}
	if got := h.deferrals("q", ReasonConcurrency); got < float64(len(deferred)) {
		t.Errorf("deferrals = %v, want >= %d", got, len(deferred))
	}
	if got := h.outcome("q", OutcomeDeferred); got != h.deferrals("q", ReasonConcurrency) {
		t.Errorf("tasks_total{deferred} = %v, want deferrals_total{concurrency} = %v", got, h.deferrals("q", ReasonConcurrency))
	}
	if got := isFailureCalls.Load(); got != 0 {
		t.Errorf("user IsFailure called %d times, want 0: deferrals are decided before it", got)
	}
}

func TestLastAttemptWaitsInsteadOfDeferring(t *testing.T) {
	h := newHarness(t, Limits{Queues: map[string]Budget{"q": fastDefer(Budget{Concurrency: 1})}}, asynq.Config{
		Concurrency: 6,
		Queues:      map[string]int{"q": 1},
	}, WithoutGate()) // with the gate, the tasks would wait in Redis instead
	const total = 12
	for range total {
		h.enqueue("q", "work", nil, asynq.MaxRetry(0))
	}
	peaks := newPeakTracker()
	h.start(peaks.handler(30 * time.Millisecond))

	info := h.waitSettled("q", 30*time.Second)
	if info.Completed != total {
		t.Errorf("completed = %d, want %d", info.Completed, total)
	}
	if info.Archived != 0 {
		t.Errorf("archived = %d, want 0: a deferral of a last attempt loses the task", info.Archived)
	}
	if peak, _ := peaks.get("q"); peak != 1 {
		t.Errorf("peak in flight = %d, want 1", peak)
	}
	if got := testutil.ToFloat64(h.srv.limiter.metrics.waits.WithLabelValues("q")); got == 0 {
		t.Errorf("waits_total = 0, want > 0: the test did not saturate the queue")
	}
	if got := h.deferrals("q", ReasonConcurrency); got != 0 {
		t.Errorf("deferrals = %v, want 0 for tasks on their last attempt", got)
	}
}

func TestSubSecondTimeout(t *testing.T) {
	h := newHarness(t, Limits{Queues: map[string]Budget{"q": {Timeout: 300 * time.Millisecond}}}, asynq.Config{
		Queues: map[string]int{"q": 1},
	})
	task := h.enqueue("q", "wait", nil, asynq.MaxRetry(0), asynq.Timeout(time.Hour))
	type seen struct {
		budget  time.Duration
		elapsed time.Duration
	}
	got := make(chan seen, 1)
	h.start(asynq.HandlerFunc(func(ctx context.Context, _ *asynq.Task) error {
		start := time.Now()
		deadline, _ := ctx.Deadline()
		<-ctx.Done()
		got <- seen{budget: deadline.Sub(start), elapsed: time.Since(start)}
		return ctx.Err()
	}))

	s := <-got
	if s.budget <= 0 || s.budget > 300*time.Millisecond {
		t.Errorf("handler deadline = start + %s, want within the 300ms budget", s.budget)
	}
	if s.elapsed >= time.Second {
		t.Errorf("handler context ended after %s, want before 1s", s.elapsed)
	}
	h.waitSettled("q", 10*time.Second)
	info := h.taskInfo("q", task.ID)
	if info.State != asynq.TaskStateArchived || !strings.Contains(info.LastErr, "deadline exceeded") {
		t.Errorf("task state %v, last error %q; want archived with a deadline error", info.State, info.LastErr)
	}
	if got := h.outcome("q", OutcomeTimedOut); got != 1 {
		t.Errorf("tasks_total{timed_out} = %v, want 1", got)
	}
}

func TestAbandonedHandlerHoldsBudget(t *testing.T) {
	h := newHarness(t, Limits{Queues: map[string]Budget{"q": fastDefer(Budget{Concurrency: 1, Timeout: 200 * time.Millisecond})}},
		asynq.Config{Concurrency: 4, Queues: map[string]int{"q": 1}},
		WithAbandonGrace(50*time.Millisecond))
	stubborn := h.enqueue("q", "ignore", nil, asynq.MaxRetry(0))

	var mu sync.Mutex
	var stubbornEnd, quickStart time.Time
	stubbornStarted := make(chan struct{})
	mux := asynq.NewServeMux()
	mux.HandleFunc("ignore", func(context.Context, *asynq.Task) error {
		close(stubbornStarted)
		time.Sleep(1500 * time.Millisecond) // ignores its context
		mu.Lock()
		stubbornEnd = time.Now()
		mu.Unlock()
		return nil
	})
	mux.HandleFunc("quick", func(context.Context, *asynq.Task) error {
		mu.Lock()
		quickStart = time.Now()
		mu.Unlock()
		return nil
	})
	h.start(mux)
	<-stubbornStarted
	quick := h.enqueue("q", "quick", nil, asynq.MaxRetry(3))

	abandoned := h.srv.limiter.metrics.abandoned.WithLabelValues("q")
	inFlight := h.srv.limiter.metrics.inFlight.WithLabelValues("q")
	waitFor(t, 5*time.Second, func() bool { return testutil.ToFloat64(abandoned) == 1 },
		func() string { return "abandoned_tasks never reached 1" })
	if got := testutil.ToFloat64(inFlight); got != 1 {
		t.Errorf("tasks_in_flight while abandoned = %v, want 1", got)
	}

	waitFor(t, 10*time.Second, func() bool { return h.taskInfo("q", quick.ID).State == asynq.TaskStateCompleted },
		func() string { return "quick task never completed" })
	mu.Lock()
	if quickStart.Before(stubbornEnd) {
		t.Errorf("quick task started %s before the abandoned handler returned; the budget was released early",
			stubbornEnd.Sub(quickStart))
	}
	mu.Unlock()
	if got := testutil.ToFloat64(abandoned); got != 0 {
		t.Errorf("abandoned_tasks after the handler returned = %v, want 0", got)
	}
	if got := h.outcome("q", OutcomeTimedOut); got != 1 {
		t.Errorf("tasks_total{timed_out} = %v, want 1", got)
	}
	if got := h.taskInfo("q", quick.ID).Retried; got != 0 {
		t.Errorf("quick task Retried = %d, want 0", got)
	}
	logs := h.logs.String()
	if n := strings.Count(logs, "ignores its context"); n != 1 {
		t.Errorf("abandonment logged %d times, want once:\n%s", n, logs)
	}
	if !strings.Contains(logs, "task_id="+stubborn.ID) {
		t.Errorf("logs do not name the abandoned task %s:\n%s", stubborn.ID, logs)
	}
}

func TestPayloadCap(t *testing.T) {
	var reported []error
	var mu sync.Mutex
	h := newHarness(t, Limits{Queues: map[string]Budget{"q": {MaxPayload: 16}}}, asynq.Config{
		Queues: map[string]int{"q": 1},
		ErrorHandler: asynq.ErrorHandlerFunc(func(_ context.Context, _ *asynq.Task, err error) {
			mu.Lock()
			reported = append(reported, err)
			mu.Unlock()
		}),
	})
	secret := "secret-" + strings.Repeat("x", 100)
	big := h.enqueue("q", "work", []byte(secret), asynq.MaxRetry(5))
	small := h.enqueue("q", "work", []byte("ok"), asynq.MaxRetry(5))
	var ran atomic.Int64
	h.start(asynq.HandlerFunc(func(context.Context, *asynq.Task) error {
		ran.Add(1)
		return nil
	}))

	h.waitSettled("q", 10*time.Second)
	info := h.taskInfo("q", big.ID)
	if info.State != asynq.TaskStateArchived {
		t.Errorf("oversized task state = %v, want archived", info.State)
	}
	if info.Retried != 0 {
		t.Errorf("oversized task Retried = %d, want 0: it is archived at once", info.Retried)
	}
	for _, want := range []string{"107 bytes", "MaxPayload of 16 bytes", `queue "q"`} {
		if !strings.Contains(info.LastErr, want) {
			t.Errorf("last error %q does not contain %q", info.LastErr, want)
		}
	}
	if got := h.taskInfo("q", small.ID).State; got != asynq.TaskStateCompleted {
		t.Errorf("small task state = %v, want completed", got)
	}
	if got := ran.Load(); got != 1 {
		t.Errorf("handler ran %d times, want 1 (the small task only)", got)
	}
	if got := h.outcome("q", OutcomeRejected); got != 1 {
		t.Errorf("tasks_total{rejected} = %v, want 1", got)
	}
	mu.Lock()
	if len(reported) != 1 || !errors.Is(reported[0], ErrPayloadTooLarge) {
		t.Errorf("user ErrorHandler saw %v, want one ErrPayloadTooLarge", reported)
	}
	mu.Unlock()
	if logs := h.logs.String(); strings.Contains(logs, "secret-") {
		t.Errorf("logs contain the payload:\n%s", logs)
	}
}

func TestObserveModeRunsEverything(t *testing.T) {
	h := newHarness(t, Limits{
		Queues: map[string]Budget{"q": {Concurrency: 1, MaxPayload: 8}},
		Mode:   Observe,
	}, asynq.Config{Concurrency: 6, Queues: map[string]int{"q": 1}})
	const total = 6
	for range total - 1 {
		h.enqueue("q", "work", nil, asynq.MaxRetry(3))
	}
	h.enqueue("q", "work", []byte("larger than eight bytes"), asynq.MaxRetry(3))
	peaks := newPeakTracker()
	h.start(peaks.handler(200 * time.Millisecond))

	info := h.waitSettled("q", 20*time.Second)
	if info.Completed != total || info.Archived != 0 {
		t.Errorf("completed %d, archived %d; want %d and 0", info.Completed, info.Archived, total)
	}
	if peak, _ := peaks.get("q"); peak < 2 {
		t.Errorf("peak in flight = %d, want >= 2: observe mode must not enforce the cap of 1", peak)
	}
	if got := h.deferrals("q", ReasonConcurrency); got == 0 {
		t.Errorf("deferrals_total = 0, want the decisions counted")
	}
	if got := h.count(h.srv.limiter.metrics.rejections, "q", rejectPayload); got != 1 {
		t.Errorf("rejections_total{payload} = %v, want 1", got)
	}
	for _, o := range []Outcome{OutcomeDeferred, OutcomeRejected} {
		if got := h.outcome("q", o); got != 0 {
			t.Errorf("tasks_total{%s} = %v, want 0 in observe mode", o, got)
		}
	}
	if got := h.outcome("q", OutcomeSucceeded); got != total {
		t.Errorf("tasks_total{succeeded} = %v, want %d", got, total)
	}
}

func TestPanicReleasesBudget(t *testing.T) {
	h := newHarness(t, Limits{Queues: map[string]Budget{"q": {Concurrency: 1}}}, asynq.Config{
		Queues: map[string]int{"q": 1},
	})
	bad := h.enqueue("q", "panic", nil, asynq.MaxRetry(0))
	good := h.enqueue("q", "fine", nil, asynq.MaxRetry(0))
	mux := asynq.NewServeMux()
	mux.HandleFunc("panic", func(context.Context, *asynq.Task) error { panic("handler bug") })
	mux.HandleFunc("fine", func(context.Context, *asynq.Task) error { return nil })
	h.start(mux)

	h.waitSettled("q", 10*time.Second)
	if info := h.taskInfo("q", bad.ID); info.State != asynq.TaskStateArchived || !strings.Contains(info.LastErr, "handler bug") {
		t.Errorf("panicking task: state %v, last error %q; want archived with the panic", info.State, info.LastErr)
	}
	if got := h.taskInfo("q", good.ID).State; got != asynq.TaskStateCompleted {
		t.Errorf("task after the panic: state %v, want completed", got)
	}
	if got := h.outcome("q", OutcomeFailed); got != 1 {
		t.Errorf("tasks_total{failed} = %v, want 1", got)
	}
}

func TestFailedHandlerCounted(t *testing.T) {
	h := newHarness(t, Limits{Queues: map[string]Budget{"q": {}}}, asynq.Config{Queues: map[string]int{"q": 1}})
	task := h.enqueue("q", "fail", nil, asynq.MaxRetry(0))
	h.start(asynq.HandlerFunc(func(context.Context, *asynq.Task) error { return errTest }))

	h.waitSettled("q", 10*time.Second)
	if info := h.taskInfo("q", task.ID); !strings.Contains(info.LastErr, errTest.Error()) {
		t.Errorf("last error = %q, want the handler's error unchanged", info.LastErr)
	}
	if got := h.outcome("q", OutcomeFailed); got != 1 {
		t.Errorf("tasks_total{failed} = %v, want 1", got)
	}
}

func TestGoexitReleasesBudget(t *testing.T) {
	h := newHarness(t, Limits{Queues: map[string]Budget{"q": {Concurrency: 1}}}, asynq.Config{
		Queues: map[string]int{"q": 1},
	})
	bad := h.enqueue("q", "goexit", nil, asynq.MaxRetry(0))
	good := h.enqueue("q", "fine", nil, asynq.MaxRetry(0))
	mux := asynq.NewServeMux()
	mux.HandleFunc("goexit", func(context.Context, *asynq.Task) error {
		runtime.Goexit()
		return nil
	})
	mux.HandleFunc("fine", func(context.Context, *asynq.Task) error { return nil })
	h.start(mux)

	h.waitSettled("q", 10*time.Second)
	if info := h.taskInfo("q", bad.ID); info.State != asynq.TaskStateArchived || !strings.Contains(info.LastErr, "Goexit") {
		t.Errorf("Goexit task: state %v, last error %q; want archived with a Goexit error", info.State, info.LastErr)
	}
	if got := h.taskInfo("q", good.ID).State; got != asynq.TaskStateCompleted {
		t.Errorf("task after the Goexit: state %v, want completed", got)
	}
	if got := testutil.ToFloat64(h.srv.limiter.metrics.inFlight.WithLabelValues("q")); got != 0 {
		t.Errorf("tasks_in_flight = %v, want 0", got)
	}
}

func TestHandlerOverBudgetErrorFails(t *testing.T) {
	var reported atomic.Int64
	h := newHarness(t, Limits{Queues: map[string]Budget{"q": {}}}, asynq.Config{
		Queues: map[string]int{"q": 1},
		ErrorHandler: asynq.ErrorHandlerFunc(func(context.Context, *asynq.Task, error) {
			reported.Add(1)
		}),
	})
	task := h.enqueue("q", "quota", nil, asynq.MaxRetry(0))
	var runs atomic.Int64
	h.start(asynq.HandlerFunc(func(context.Context, *asynq.Task) error {
		runs.Add(1)
		return errors.Join(errors.New("quota exhausted"), ErrOverBudget)
	}))

	h.waitSettled("q", 10*time.Second)
	if got := h.taskInfo("q", task.ID).State; got != asynq.TaskStateArchived {
		t.Errorf("state = %v, want archived: a handler's own ErrOverBudget is a failure", got)
	}
	if got := runs.Load(); got != 1 {
		t.Errorf("handler ran %d times, want 1", got)
	}
	if got := reported.Load(); got != 1 {
		t.Errorf("user ErrorHandler called %d times, want 1", got)
	}
}

func TestMiddlewareAppliedTwice(t *testing.T) {
	h := newHarness(t, Limits{Queues: map[string]Budget{"q": fastDefer(Budget{Concurrency: 1})}}, asynq.Config{
		Concurrency: 4,
		Queues:      map[string]int{"q": 1},
	})
	const total = 5
	for range total {
		h.enqueue("q", "work", nil, asynq.MaxRetry(2))
	}
	peaks := newPeakTracker()
	mux := asynq.NewServeMux()
	mux.Use(h.srv.Limiter().Middleware())
	mux.Handle("work", peaks.handler(20*time.Millisecond))
	h.start(mux)

	info := h.waitSettled("q", 20*time.Second)
	if info.Completed != total {
		t.Errorf("completed = %d, want %d", info.Completed, total)
	}
	if peak, _ := peaks.get("q"); peak != 1 {
		t.Errorf("peak in flight = %d, want 1", peak)
	}
	if n := strings.Count(h.logs.String(), "middleware ran inside a task it already admitted"); n != 1 {
		t.Errorf("warning logged %d times, want once", n)
	}
}

func TestPanicNamesHandlerLocation(t *testing.T) {
	h := newHarness(t, Limits{Queues: map[string]Budget{"q": {}}}, asynq.Config{Queues: map[string]int{"q": 1}})
	task := h.enqueue("q", "panic", nil, asynq.MaxRetry(0))
	h.start(asynq.HandlerFunc(func(context.Context, *asynq.Task) error {
		var m map[string]int
		m["x"] = 1 // a runtime panic: assignment to entry in nil map
		return nil
	}))

	h.waitSettled("q", 10*time.Second)
	info := h.taskInfo("q", task.ID)
	for _, want := range []string{"assignment to entry in nil map", "handler panicked at", "integration_test.go:"} {
		if !strings.Contains(info.LastErr, want) {
			t.Errorf("last error %q does not contain %q", info.LastErr, want)
		}
	}
}

func TestObserveModeCountsTimeouts(t *testing.T) {
	h := newHarness(t, Limits{
		Queues: map[string]Budget{"q": {Timeout: 100 * time.Millisecond}},
		Mode:   Observe,
	}, asynq.Config{Queues: map[string]int{"q": 1}})
	task := h.enqueue("q", "slow", nil, asynq.MaxRetry(0))
	h.start(asynq.HandlerFunc(func(ctx context.Context, _ *asynq.Task) error {
		select {
		case <-ctx.Done():
			return ctx.Err()
		case <-time.After(300 * time.Millisecond):
			return nil
		}
	}))

	h.waitSettled("q", 10*time.Second)
	if got := h.taskInfo("q", task.ID).State; got != asynq.TaskStateCompleted {
		t.Errorf("state = %v, want completed: observe mode must not end the context", got)
	}
	if got := testutil.ToFloat64(h.srv.limiter.metrics.timeouts.WithLabelValues("q")); got != 1 {
		t.Errorf("timeouts_total = %v, want 1", got)
	}
	if got := h.outcome("q", OutcomeTimedOut); got != 0 {
		t.Errorf("tasks_total{timed_out} = %v, want 0 in observe mode", got)
	}
}
