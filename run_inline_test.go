package asynqlimit

import (
	"context"
	"errors"
	"log/slog"
	"runtime"
	"strings"
	"testing"
	"time"

	"github.com/hibiken/asynq"
	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/testutil"
)

// finishRun waits for a run that start began and returns its error, as
// handle does.
func finishRun(l *Limiter, r *taskRun, ctx context.Context) error {
	if r.inline {
		return l.runInline(r)
	}
	return l.end(r, l.await(r, ctx))
}

func TestRunsInline(t *testing.T) {
	skipWithoutThreadCPU(t)
	for _, tc := range []struct {
		name    string
		budget  Budget
		limits  func(*Limits)
		opts    []Option
		preempt bool // a task of a queue below the highest priority, not on its last attempt
		want    bool
	}{
		{name: "CPU budget", budget: Budget{CPU: 1}, want: true},
		{name: "no CPU accounting", budget: Budget{Concurrency: 4}, want: false},
		{name: "CPU accounting turned off", budget: Budget{CPU: 1}, opts: []Option{WithoutCPUAccounting()}, want: false},
		{name: "Timeout", budget: Budget{CPU: 1, Timeout: time.Minute}, want: false},
		{name: "TaskCPU", budget: Budget{TaskCPU: time.Second}, want: false},
		{name: "observe mode with Timeout and TaskCPU", budget: Budget{CPU: 1, Timeout: time.Minute, TaskCPU: time.Second},
			limits: func(l *Limits) { l.Mode = Observe }, want: true},
		{name: "preemptible", budget: Budget{CPU: 1}, preempt: true,
			limits: func(l *Limits) { l.Process.MemoryHard = 1 << 40 }, want: false},
		{name: "highest priority under hard memory threshold", budget: Budget{CPU: 1, Priority: 1},
			limits: func(l *Limits) { l.Process.MemoryHard = 1 << 40 }, preempt: true, want: true},
	} {
		t.Run(tc.name, func(t *testing.T) {
			limits := Limits{Default: tc.budget, Queues: map[string]Budget{"top": {Priority: 1}}}
			if tc.limits != nil {
				tc.limits(&limits)
			}
			opts := append([]Option{WithRegisterer(prometheus.NewRegistry()), WithSampler(&fakeSampler{})}, tc.opts...)
			l, err := New(limits, opts...)
			if err != nil {
				t.Fatal(err)
			}
			defer l.Close()
			q := l.queue("")
			r := &taskRun{preemptible: tc.preempt}
			deadline := tc.budget.Timeout > 0 && limits.Mode == Enforce
			if got := l.runsInline(q, r, deadline); got != tc.want {
				t.Errorf("runsInline = %v, want %v", got, tc.want)
			}
		})
	}
}

// TestInlineHandlerRunsInCallersGoroutine calls the middleware of a queue
// with a CPU budget and nothing that stops its tasks: the handler runs on
// the caller's stack, and its CPU time is still measured.
func TestInlineHandlerRunsInCallersGoroutine(t *testing.T) {
	skipWithoutThreadCPU(t)
	reg := prometheus.NewRegistry()
	l, err := New(Limits{Default: Budget{CPU: 4}}, WithRegisterer(reg), WithSampleInterval(time.Hour))
	if err != nil {
		t.Fatal(err)
	}
	defer l.Close()
	var stack string
	h := l.Middleware()(asynq.HandlerFunc(func(ctx context.Context, _ *asynq.Task) error {
		buf := make([]byte, 16<<10)
		stack = string(buf[:runtime.Stack(buf, false)])
		return spin(ctx, 20*time.Millisecond)
	}))
	if err := h.ProcessTask(context.Background(), asynq.NewTask("spin", nil)); err != nil {
		t.Fatal(err)
	}
	if !strings.Contains(stack, "TestInlineHandlerRunsInCallersGoroutine") {
		t.Errorf("the handler ran on another goroutine; its stack:\n%s", stack)
	}
	q := l.queue("")
	if got := histogramSum(t, reg, "asynqlimit_task_cpu_seconds", otherLabel); got < 0.005 {
		t.Errorf("task_cpu_seconds sum %.4f s for a task that spun for 20 ms, want at least 0.005", got)
	}
	if got := q.cpu.finished; got < 5*time.Millisecond {
		t.Errorf("measured CPU time %v for a task that spun for 20 ms, want at least 5 ms", got)
	}
	if got := q.inFlight.Load(); got != 0 {
		t.Errorf("in flight after the task returned: %d, want 0", got)
	}
}

// TestInlineAbandonedHandler ends the context of a handler that runs in the
// middleware's goroutine and ignores it: the CPU samples count it as
// abandoned after the grace period, and it keeps its slot until it returns.
func TestInlineAbandonedHandler(t *testing.T) {
	skipWithoutThreadCPU(t)
	logs := &syncBuffer{}
	l, err := New(Limits{Default: Budget{CPU: 4, Concurrency: 1}},
		WithRegisterer(prometheus.NewRegistry()), WithSampleInterval(time.Hour),
		WithAbandonGrace(20*time.Millisecond), WithLogger(slog.New(slog.NewTextHandler(logs, nil))))
	if err != nil {
		t.Fatal(err)
	}
	defer l.Close()
	release := make(chan struct{})
	started := make(chan struct{})
	h := l.Middleware()(asynq.HandlerFunc(func(context.Context, *asynq.Task) error {
		close(started)
		<-release // ignores its context
		return nil
	}))
	ctx, cancel := context.WithCancel(context.Background())
	result := make(chan error, 1)
	go func() { result <- h.ProcessTask(ctx, asynq.NewTask("stuck", nil)) }()
	<-started
	q := l.queue("")

	l.sampleCPU()
	cancel()
	l.sampleCPU() // records when the context ended
	if got := testutil.ToFloat64(q.metrics.abandoned); got != 0 {
		t.Fatalf("abandoned = %v before the grace period passed, want 0", got)
	}
	time.Sleep(30 * time.Millisecond)
	l.sampleCPU()
	if got := testutil.ToFloat64(q.metrics.abandoned); got != 1 {
		t.Fatalf("abandoned = %v after the grace period, want 1", got)
	}
	if !strings.Contains(logs.String(), "handler ignores its context") {
		t.Errorf("no log line for the abandoned handler; logs:\n%s", logs)
	}
	if q.tryAcquire() {
		t.Fatal("the queue's only slot was free while the abandoned handler still ran")
	}

	close(release)
	if err := <-result; !errors.Is(err, context.Canceled) {
		t.Errorf("middleware returned %v, want an error wrapping context.Canceled", err)
	}
	if got := testutil.ToFloat64(q.metrics.abandoned); got != 0 {
		t.Errorf("abandoned = %v after the handler returned, want 0", got)
	}
	if got := testutil.ToFloat64(q.metrics.outcomes[OutcomeFailed]); got != 1 {
		t.Errorf("failed outcomes = %v, want 1 (counted once)", got)
	}
	if !q.tryAcquire() {
		t.Error("the slot stayed held after the abandoned handler returned")
	}
}

// TestInlineGoexitReleasesBudget runs a handler that calls runtime.Goexit in
// the middleware's goroutine: the goroutine ends, the budget is released and
// the call is logged.
func TestInlineGoexitReleasesBudget(t *testing.T) {
	skipWithoutThreadCPU(t)
	logs := &syncBuffer{}
	l, err := New(Limits{Default: Budget{CPU: 4, Concurrency: 1}},
		WithRegisterer(prometheus.NewRegistry()), WithSampleInterval(time.Hour),
		WithLogger(slog.New(slog.NewTextHandler(logs, nil))))
	if err != nil {
		t.Fatal(err)
	}
	defer l.Close()

	h := l.Middleware()(asynq.HandlerFunc(func(context.Context, *asynq.Task) error {
		runtime.Goexit()
		return nil
	}))
	returned := make(chan bool, 1)
	exited := make(chan struct{})
	go func() {
		defer close(exited)
		_ = h.ProcessTask(context.Background(), asynq.NewTask("exit", nil))
		returned <- true
	}()
	<-exited

	if len(returned) != 0 {
		t.Fatal("the middleware returned from a handler that called runtime.Goexit in its goroutine")
	}
	q := l.queue("")
	if got := q.inFlight.Load(); got != 0 {
		t.Errorf("in flight = %d after the handler exited, want 0", got)
	}
	if !q.tryAcquire() {
		t.Error("the slot stayed held after the handler exited")
	}
	if !strings.Contains(logs.String(), "asynq fails the task at its deadline") {
		t.Errorf("no log line for the Goexit; logs:\n%s", logs)
	}
}

// TestInlinePanicReachesCaller checks that a panic in a handler that runs in
// the middleware's goroutine reaches the caller, as asynq's recovery
// expects, after the budget is released.
func TestInlinePanicReachesCaller(t *testing.T) {
	skipWithoutThreadCPU(t)
	l, err := New(Limits{Default: Budget{CPU: 4}},
		WithRegisterer(prometheus.NewRegistry()), WithSampleInterval(time.Hour), WithLogger(slog.New(slog.DiscardHandler)))
	if err != nil {
		t.Fatal(err)
	}
	defer l.Close()
	h := l.Middleware()(asynq.HandlerFunc(func(context.Context, *asynq.Task) error {
		panic("boom")
	}))
	var recovered any
	func() {
		defer func() { recovered = recover() }()
		_ = h.ProcessTask(context.Background(), asynq.NewTask("boom", nil))
	}()
	if recovered == nil || !strings.Contains(recovered.(error).Error(), "boom") {
		t.Fatalf("recovered %v, want the handler's panic", recovered)
	}
	q := l.queue("")
	if got := q.inFlight.Load(); got != 0 {
		t.Errorf("in flight = %d after the panic, want 0", got)
	}
	if got := testutil.ToFloat64(q.metrics.outcomes[OutcomeFailed]); got != 1 {
		t.Errorf("failed outcomes = %v, want 1", got)
	}
}
