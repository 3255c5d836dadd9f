package asynqlimit

import (
	"context"
	"testing"
	"time"

	"github.com/hibiken/asynq"
	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/testutil"
)

func TestRamp(t *testing.T) {
	var r ramp
	first := r.add(30)
	second := r.add(20)
	if got := r.total(); got != 50 {
		t.Fatalf("total after adding 30 and 20 = %d, want 50", got)
	}
	r.done(first, 30)
	if got := r.total(); got != 20 {
		t.Errorf("total after the first task finished = %d, want 20", got)
	}

	r.reset()
	if got := r.total(); got != 0 {
		t.Errorf("total after a sample = %d, want 0", got)
	}
	r.done(second, 20) // counted by the sample already
	if got := r.total(); got != 0 {
		t.Errorf("total after a task of the earlier epoch finished = %d, want 0", got)
	}

	third := r.add(5)
	r.reset()
	r.done(third, 5)
	r.sum.Add(-5) // a done that raced with reset, as the type's comment allows
	if got := r.total(); got != 0 {
		t.Errorf("total with a negative sum = %d, want 0", got)
	}
}

func TestCPURampForgetsFinishedTasks(t *testing.T) {
	skipWithoutThreadCPU(t)
	reg := prometheus.NewRegistry()
	l, err := New(Limits{Default: Budget{CPU: 0.5}},
		WithRegisterer(reg), WithSampleInterval(time.Hour))
	if err != nil {
		t.Fatal(err)
	}
	defer l.Close()

	// Until a sample measures running tasks, each one counts as a whole
	// core, over the budget of 0.5. Tasks that run one after another never
	// run beside another, so none may count as over budget. Without asynq's
	// metadata in the context, a task is on its last attempt: it runs, and
	// a deferral would only be counted.
	runTasks(t, l, 200)
	if got := testutil.ToFloat64(l.queue("").metrics.deferrals[ReasonCPU]); got != 0 {
		t.Errorf("deferrals{cpu} after 200 tasks one after another = %v, want 0", got)
	}
}

func TestCPURampCountsRunningTasks(t *testing.T) {
	skipWithoutThreadCPU(t)
	l, err := New(Limits{Default: Budget{CPU: 0.5}},
		WithRegisterer(prometheus.NewRegistry()), WithSampleInterval(time.Hour))
	if err != nil {
		t.Fatal(err)
	}
	defer l.Close()

	release := make(chan struct{})
	started := make(chan struct{})
	h := l.Middleware()(asynq.HandlerFunc(func(context.Context, *asynq.Task) error {
		started <- struct{}{}
		<-release
		return nil
	}))
	ctx := context.Background()
	errs := make(chan error, 2)
	for range 2 {
		go func() { errs <- h.ProcessTask(ctx, asynq.NewTask("block", nil)) }()
		<-started
	}
	close(release)
	for range 2 {
		if err := <-errs; err != nil {
			t.Fatal(err)
		}
	}
	// The second task arrived while the first ran, counted as a whole core.
	// It is on its last attempt, so it ran, and the deferral was counted.
	if got := testutil.ToFloat64(l.queue("").metrics.deferrals[ReasonCPU]); got != 1 {
		t.Errorf("deferrals{cpu} for a task admitted beside a running one = %v, want 1", got)
	}
}

func TestMemoryRampForgetsFinishedTasks(t *testing.T) {
	l, sampler, _ := newMonitoredLimiter(t, Limits{
		Default: Budget{Priority: 0, TaskMemory: 30},
		Queues:  map[string]Budget{"high": {Priority: 1}},
		Process: ProcessLimits{MemorySoft: 100, MemoryHard: 500},
	})
	sampler.set(50, nil)
	l.monitor.step(ResourceSample{RSS: 50}, nil, time.Unix(1000, 0))

	// 50 + 30 stays below the soft 100; 50 + 30 + 30 would not. Tasks
	// that run one after another never hold two reservations at once.
	runTasks(t, l, 20)
	if got := testutil.ToFloat64(l.queue("").metrics.deferrals[ReasonPressure]); got != 0 {
		t.Errorf("deferrals{pressure} after 20 tasks one after another = %v, want 0", got)
	}
	if got := l.monitor.pending.total(); got != 0 {
		t.Errorf("pending reservations after every task finished = %d, want 0", got)
	}
}

func TestUnseenReservations(t *testing.T) {
	var u unseen
	first, second := u.add(100), u.add(100)
	if got := u.total(); got != 200 {
		t.Fatalf("total after two reservations of 100 = %d, want 200", got)
	}

	// The memory grew by as much as the older task reserved: that task has
	// allocated, the newer one has not.
	u.grew(100)
	if got := u.total(); got != 100 {
		t.Errorf("total after 100 bytes of growth = %d, want 100", got)
	}
	u.done(first)
	if got := u.total(); got != 100 {
		t.Errorf("total after the task the samples show finished = %d, want 100, the newer task's", got)
	}

	u.grew(30)
	u.grew(-50) // memory freed by the finished task takes nothing off
	if got := u.total(); got != 70 {
		t.Errorf("total after 30 more bytes of growth = %d, want 70", got)
	}
	u.done(second)
	if got := u.total(); got != 0 {
		t.Errorf("total after every task finished = %d, want 0", got)
	}
	if u.add(0) != nil || u.total() != 0 {
		t.Errorf("add(0) counted a reservation, want nothing")
	}
	u.done(nil) // a task without a reservation
}
