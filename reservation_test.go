package asynqlimit

import (
	"context"
	"math"
	"testing"
	"time"

	"github.com/hibiken/asynq"
	"github.com/prometheus/client_golang/prometheus/testutil"
)

// twoPriorities has a low default queue and a high queue, with process
// memory thresholds at 100 (soft) and 500 (hard) bytes.
func twoPriorities(taskMemory int64) Limits {
	return Limits{
		Default: Budget{Priority: 0, TaskMemory: taskMemory},
		Queues:  map[string]Budget{"high": {Priority: 1}},
		Process: ProcessLimits{MemorySoft: 100, MemoryHard: 500},
	}
}

// blockingTasks starts n tasks of typ through h, each of which blocks until
// release is closed, and returns once all of them run.
func blockingTasks(t *testing.T, h asynq.Handler, typ string, n int, started chan struct{}) chan error {
	t.Helper()
	errs := make(chan error, n)
	for range n {
		go func() { errs <- h.ProcessTask(context.Background(), asynq.NewTask(typ, nil)) }()
		select {
		case <-started:
		case <-time.After(5 * time.Second):
			t.Fatal("task did not start")
		}
	}
	return errs
}

// A math.MaxInt64 estimate on a queue without a Memory budget must not wrap
// the sum of the sample and the reservations negative, which would admit
// the task and every task beside it.
func TestHugeEstimateIsShed(t *testing.T) {
	l, sampler, _ := newMonitoredLimiter(t, twoPriorities(0), WithMemoryEstimator(func(_ string, t *asynq.Task) int64 {
		if t.Type() == "huge" {
			return math.MaxInt64
		}
		return 30
	}))
	sampler.set(50, nil)
	l.monitor.step(ResourceSample{RSS: 50}, nil, time.Unix(1000, 0))

	started, release := make(chan struct{}), make(chan struct{})
	h := l.Middleware()(blockingHandler(started, release))
	// Without asynq's metadata the task is on its last attempt: it runs,
	// and the shedding decision is only counted.
	errs := blockingTasks(t, h, "huge", 1, started)
	shed := l.queue("").metrics.deferrals[ReasonPressure]
	if got := testutil.ToFloat64(shed); got != 1 {
		t.Errorf("deferrals{pressure} for a task with a reservation of math.MaxInt64 bytes at RSS 50 = %v, want 1", got)
	}

	// 50 + 30 + 30 reaches the soft 100 even without the huge task.
	errs2 := blockingTasks(t, h, "small", 2, started)
	if got := testutil.ToFloat64(shed); got < 2 {
		t.Errorf("deferrals{pressure} after a second 30-byte task beside the huge one = %v, want >= 2", got)
	}
	close(release)
	for range 1 {
		<-errs
	}
	for range 2 {
		<-errs2
	}
}

// A running task shows in the samples only once it has allocated, so its
// reservation counts until then, across samples: 3 tasks of 30 bytes at RSS
// 50 reach the soft threshold of 100.
func TestReservationsCountUntilAllocated(t *testing.T) {
	l, sampler, _ := newMonitoredLimiter(t, twoPriorities(30))
	sampler.set(50, nil)
	l.monitor.step(ResourceSample{RSS: 50}, nil, time.Unix(1000, 0))

	started, release := make(chan struct{}), make(chan struct{})
	h := l.Middleware()(blockingHandler(started, release))
	shed := l.queue("").metrics.deferrals[ReasonPressure]
	errs := blockingTasks(t, h, "first", 1, started) // 50 + 30: admitted
	// The next sample: the task has not allocated, so RSS is unchanged.
	l.monitor.step(ResourceSample{RSS: 50}, nil, time.Unix(1001, 0))
	errs2 := blockingTasks(t, h, "second", 1, started) // 50 + 30 again
	l.monitor.step(ResourceSample{RSS: 50}, nil, time.Unix(1002, 0))
	errs3 := blockingTasks(t, h, "third", 1, started)
	if got := testutil.ToFloat64(shed); got == 0 {
		t.Errorf("deferrals{pressure} = 0 after 3 tasks of 30 bytes were admitted at RSS 50 with a soft threshold of 100; "+
			"the reservations of the running tasks were forgotten at each sample (pending = %d)", l.monitor.pending.total())
	}
	close(release)
	<-errs
	<-errs2
	<-errs3
}
