package asynqlimit

import (
	"context"
	"strings"
	"testing"
	"time"

	"github.com/hibiken/asynq"
	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/testutil"

	"github.com/asynqlimit/asynqlimit/internal/threadcpu"
)

// spin burns CPU on the calling goroutine for d of wall time, or until ctx
// ends, and returns ctx.Err().
func spin(ctx context.Context, d time.Duration) error {
	deadline := time.Now().Add(d)
	x := 0
	for time.Now().Before(deadline) {
		for i := range 10000 {
			x += i
		}
		if ctx.Err() != nil {
			return ctx.Err()
		}
	}
	_ = x
	return nil
}

func skipWithoutThreadCPU(t *testing.T) {
	t.Helper()
	if !threadcpu.Supported() {
		t.Skip("thread CPU time is measured only on Linux")
	}
}

func TestCPUBudgetDefersHogQueue(t *testing.T) {
	skipWithoutThreadCPU(t)
	h := newHarness(t, Limits{Queues: map[string]Budget{
		"hog":   fastDefer(Budget{CPU: 0.3}),
		"quick": {},
	}}, asynq.Config{Concurrency: 4, Queues: map[string]int{"hog": 1, "quick": 1}},
		WithSampleInterval(50*time.Millisecond), WithCPUWindow(time.Second))
	const hogs, quicks = 15, 20
	for range hogs {
		h.enqueue("hog", "spin", nil, asynq.MaxRetry(3))
	}
	mux := asynq.NewServeMux()
	mux.HandleFunc("spin", func(ctx context.Context, _ *asynq.Task) error { return spin(ctx, 100*time.Millisecond) })
	mux.HandleFunc("quick", func(context.Context, *asynq.Task) error { return nil })
	start := time.Now()
	h.start(mux)
	for range quicks {
		h.enqueue("quick", "quick", nil)
	}

	quick := h.waitSettled("quick", 30*time.Second)
	if quick.Completed != quicks {
		t.Errorf("quick tasks completed = %d, want %d", quick.Completed, quicks)
	}
	hog := h.waitSettled("hog", 60*time.Second)
	elapsed := time.Since(start)
	if hog.Completed != hogs || hog.Archived != 0 {
		t.Errorf("hog tasks: completed %d, archived %d; want %d and 0", hog.Completed, hog.Archived, hogs)
	}
	// The dequeue gate skips the queue while it is over budget, and
	// admission defers the tasks that get past the gate.
	deferrals, skips := h.deferrals("hog", ReasonCPU), gateSkips(h.srv.limiter, "hog")
	if deferrals+skips == 0 {
		t.Errorf("deferrals{cpu} = 0 and gate_skips_total = 0, want either > 0: the budget never applied")
	}
	// Without the budget, 4 workers would use both cores of a 2-core
	// machine. With it, admission lags the window by up to a sample, so
	// this short run overshoots 0.3 cores while the first tasks start
	// together, but not by this much. The budget is low so that the queue
	// fills it even on a busy machine.
	cpu := histogramSum(t, h.reg, "asynqlimit_task_cpu_seconds", "hog")
	if cpu <= 0 {
		t.Fatalf("task_cpu_seconds{hog} sum = %v, want > 0", cpu)
	}
	cores := cpu / elapsed.Seconds()
	if cores > 0.75 {
		t.Errorf("hog queue used %.2f cores on average (%.2fs of CPU in %s), want <= 0.75 under a 0.3-core budget",
			cores, cpu, elapsed)
	}
	if cores < 0.1 {
		t.Errorf("hog queue used %.2f cores on average (%.2fs of CPU in %s), want >= 0.1: the budget is 0.3",
			cores, cpu, elapsed)
	}
}

// histogramSum returns the sum of the histogram name for queue, or -1.
func histogramSum(t *testing.T, g prometheus.Gatherer, name, queue string) float64 {
	t.Helper()
	if m := findSeries(t, g, name, map[string]string{"queue": queue}); m != nil {
		return m.GetHistogram().GetSampleSum()
	}
	return -1
}

func TestTaskCPULimitStopsTask(t *testing.T) {
	skipWithoutThreadCPU(t)
	h := newHarness(t, Limits{Queues: map[string]Budget{"q": {TaskCPU: 100 * time.Millisecond}}},
		asynq.Config{Queues: map[string]int{"q": 1}}, WithSampleInterval(20*time.Millisecond))
	hog := h.enqueue("q", "spin", nil, asynq.MaxRetry(0))
	sleeper := h.enqueue("q", "sleep", nil, asynq.MaxRetry(0))
	mux := asynq.NewServeMux()
	mux.HandleFunc("spin", func(ctx context.Context, _ *asynq.Task) error { return spin(ctx, time.Minute) })
	mux.HandleFunc("sleep", func(ctx context.Context, _ *asynq.Task) error {
		select {
		case <-time.After(500 * time.Millisecond):
			return nil
		case <-ctx.Done():
			return ctx.Err()
		}
	})
	h.start(mux)

	h.waitSettled("q", 20*time.Second)
	info := h.taskInfo("q", hog.ID)
	if info.State != asynq.TaskStateArchived || !strings.Contains(info.LastErr, "TaskCPU") {
		t.Errorf("spinning task: state %v, last error %q; want archived for its TaskCPU", info.State, info.LastErr)
	}
	if got := h.taskInfo("q", sleeper.ID).State; got != asynq.TaskStateCompleted {
		t.Errorf("sleeping task state = %v, want completed: sleeping uses no CPU", got)
	}
	if got := h.outcome("q", OutcomeTimedOut); got != 1 {
		t.Errorf("tasks_total{timed_out} = %v, want 1", got)
	}
}

func TestWithoutCPUAccounting(t *testing.T) {
	l, err := New(Limits{Queues: map[string]Budget{"q": {CPU: 1}}}, WithoutCPUAccounting())
	if err != nil {
		t.Fatal(err)
	}
	defer l.Close()
	if l.monitor != nil {
		t.Errorf("monitor started without CPU accounting or process limits")
	}
	if l.queue("q").cpuAccounting {
		t.Errorf("queue accounts CPU after WithoutCPUAccounting")
	}
}

func TestObserveCountsTaskCPUBetweenSamples(t *testing.T) {
	skipWithoutThreadCPU(t)
	l, err := New(Limits{Default: Budget{TaskCPU: 10 * time.Millisecond}, Mode: Observe},
		WithRegisterer(prometheus.NewRegistry()), WithSampleInterval(time.Hour))
	if err != nil {
		t.Fatal(err)
	}
	defer l.Close()
	h := l.Middleware()(asynq.HandlerFunc(func(ctx context.Context, _ *asynq.Task) error {
		return spin(ctx, 50*time.Millisecond)
	}))

	// No sample runs while the task does, so only its end can see it over
	// its TaskCPU.
	if err := h.ProcessTask(context.Background(), asynq.NewTask("spin", nil)); err != nil {
		t.Fatalf("ProcessTask in observe mode: %v, want nil", err)
	}
	if got := testutil.ToFloat64(l.queue("").metrics.timeouts); got != 1 {
		t.Errorf("timeouts_total after a task over its TaskCPU in observe mode = %v, want 1", got)
	}
}
