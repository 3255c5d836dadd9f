package asynqlimit

import (
	"context"
	"errors"
	"log/slog"
	"strings"
	"testing"
	"time"

	"github.com/hibiken/asynq"
	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/testutil"
)

func TestMemoryBudgetCapsReservations(t *testing.T) {
	h := newHarness(t, Limits{Queues: map[string]Budget{"m": fastDefer(Budget{Memory: 100, TaskMemory: 40})}}, asynq.Config{
		Concurrency: 8,
		Queues:      map[string]int{"m": 1},
	}, WithoutGate()) // the test needs deferrals, which the gate avoids
	const total = 10
	for range total {
		h.enqueue("m", "work", nil, asynq.MaxRetry(3))
	}
	peaks := newPeakTracker()
	h.start(peaks.handler(30 * time.Millisecond))

	info := h.waitSettled("m", 30*time.Second)
	if info.Completed != total {
		t.Errorf("completed = %d, want %d", info.Completed, total)
	}
	if peak, _ := peaks.get("m"); peak > 2 {
		t.Errorf("peak in flight = %d, want <= 2 (100 bytes / 40 per task)", peak)
	}
	if got := h.deferrals("m", ReasonMemory); got == 0 {
		t.Errorf("deferrals{memory} = 0, want > 0: the test did not fill the budget")
	}
	if got := testutil.ToFloat64(h.srv.limiter.metrics.memReserved.WithLabelValues("m")); got != 0 {
		t.Errorf("queue_memory_reserved_bytes after all tasks = %v, want 0", got)
	}
	if got := testutil.ToFloat64(h.srv.limiter.metrics.memBudget.WithLabelValues("m")); got != 100 {
		t.Errorf("queue_memory_budget_bytes = %v, want 100", got)
	}
}

func TestMemoryEstimator(t *testing.T) {
	l, err := New(Limits{Queues: map[string]Budget{"m": {Memory: 1000}}},
		WithMemoryEstimator(func(queue string, t *asynq.Task) int64 { return int64(len(t.Payload())) * 10 }))
	if err != nil {
		t.Fatal(err)
	}
	q := l.queue("m")
	tests := []struct {
		payload int
		want    int64
	}{
		{0, 0},
		{5, 50},
		{500, 1000}, // capped at the budget, so that the task fits an empty queue
	}
	for _, tt := range tests {
		if got := l.estimate(q, asynq.NewTask("t", make([]byte, tt.payload))); got != tt.want {
			t.Errorf("estimate(payload %d bytes) = %d, want %d", tt.payload, got, tt.want)
		}
	}
}

func TestMemoryBudgetNeedsEstimate(t *testing.T) {
	_, err := New(Limits{Queues: map[string]Budget{"m": {Memory: 1 << 20}}})
	var cerr *ConfigError
	if !errors.As(err, &cerr) || len(cerr.Fields) != 1 || cerr.Fields[0].Path != `Queues["m"].TaskMemory` {
		t.Fatalf("New() error = %v, want a ConfigError for Queues[\"m\"].TaskMemory", err)
	}
	l, err := New(Limits{Queues: map[string]Budget{"m": {Memory: 1 << 20}}},
		WithMemoryEstimator(func(string, *asynq.Task) int64 { return 1 }))
	if err != nil {
		t.Fatalf("New() with an estimator: %v, want nil", err)
	}
	l.Close()
}

func TestDeferralLogShowsComparedNumbers(t *testing.T) {
	logs := &syncBuffer{}
	l, err := New(Limits{Queues: map[string]Budget{"q": {Memory: 100, TaskMemory: 60}}},
		WithRegisterer(prometheus.NewRegistry()), WithLogger(slog.New(slog.NewTextHandler(logs, nil))))
	if err != nil {
		t.Fatal(err)
	}
	defer l.Close()
	q := l.queue("q")
	q.reserved.Store(60)

	if err := l.deferTask(context.Background(), q, asynq.NewTask("t", nil), ReasonMemory); !errors.Is(err, ErrOverBudget) {
		t.Fatalf("deferTask() error = %v, want ErrOverBudget", err)
	}
	for _, want := range []string{"reason=memory", "reserved_bytes=60", "task_memory_bytes=60", "memory_budget_bytes=100"} {
		if !strings.Contains(logs.String(), want) {
			t.Errorf("deferral log has no %s:\n%s", want, logs)
		}
	}
	if strings.Contains(logs.String(), "in_flight=") {
		t.Errorf("deferral log for memory shows the concurrency numbers:\n%s", logs)
	}
}

func TestMemoryWaitTimeoutCounted(t *testing.T) {
	logs := &syncBuffer{}
	l, err := New(Limits{Default: Budget{Memory: 100, TaskMemory: 60}},
		WithRegisterer(prometheus.NewRegistry()), WithLogger(slog.New(slog.NewTextHandler(logs, nil))))
	if err != nil {
		t.Fatal(err)
	}
	defer l.Close()
	q := l.queue("")
	if !q.memory.TryAcquire(60) { // a running task holds 60 of the 100 bytes
		t.Fatal("TryAcquire(60) on an empty budget = false")
	}
	defer q.memory.Release(60)

	// Without asynq's metadata the task is on its last attempt, so it waits
	// for room instead of being deferred, until its deadline.
	ctx, cancel := context.WithTimeout(context.Background(), 50*time.Millisecond)
	defer cancel()
	h := l.Middleware()(asynq.HandlerFunc(func(context.Context, *asynq.Task) error { return nil }))
	if err := h.ProcessTask(ctx, asynq.NewTask("t", nil)); !errors.Is(err, context.DeadlineExceeded) {
		t.Fatalf("ProcessTask() error = %v, want context.DeadlineExceeded", err)
	}
	if got := testutil.ToFloat64(q.metrics.outcomes[OutcomeTimedOut]); got != 1 {
		t.Errorf("tasks_total{timed_out} after the deadline passed in the memory wait = %v, want 1", got)
	}
	if !strings.Contains(logs.String(), "deadline passed while it waited for room") || !strings.Contains(logs.String(), "memory_budget_bytes=100") {
		t.Errorf("log does not report the ended memory wait with its numbers:\n%s", logs)
	}
}
