package asynqlimit

import (
	"context"
	"testing"
	"time"

	"github.com/hibiken/asynq"
	"github.com/prometheus/client_golang/prometheus"
)

// slowSampler returns an empty sample after a delay, as a process sampler
// under load or on a slow /proc would.
type slowSampler struct{ delay time.Duration }

func (s slowSampler) Sample() (ResourceSample, error) {
	time.Sleep(s.delay)
	return ResourceSample{At: time.Now()}, nil
}

// The CPU sample carries the time it was taken, not the tick's, which a slow
// process sample makes stale. projectedCores divides the CPU time of the
// tasks finished since the sample by the time since it. A stale time would
// spread a task that used most of a core over too long a time, so the queue
// would admit tasks past its CPU budget.
func TestCPUSampleTimeAfterSlowSample(t *testing.T) {
	skipWithoutThreadCPU(t)
	const sampleDelay = 300 * time.Millisecond
	l, err := New(Limits{
		Default: Budget{CPU: 0.5},
		Queues:  map[string]Budget{"high": {Priority: 1}},
		Process: ProcessLimits{MemorySoft: 100},
	}, WithRegisterer(prometheus.NewRegistry()), WithSampler(slowSampler{delay: sampleDelay}),
		WithSampleInterval(20*time.Millisecond), withDetectedLimits(testDetected))
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { l.Close() })
	q := l.queue("")

	// Wait for the end of a sample of the queue's CPU, so that the next one
	// is at least sampleDelay away.
	waitForCPUSample := func() time.Time {
		before := q.cpu.sampledAt.Load()
		deadline := time.Now().Add(5 * time.Second)
		for q.cpu.sampledAt.Load() == before {
			if time.Now().After(deadline) {
				t.Fatal("no CPU sample within 5s")
			}
			time.Sleep(time.Millisecond)
		}
		return time.Now()
	}
	waitForCPUSample()
	reset := waitForCPUSample()

	h := l.Middleware()(asynq.HandlerFunc(func(ctx context.Context, _ *asynq.Task) error {
		return spin(ctx, 60*time.Millisecond)
	}))
	if err := h.ProcessTask(context.Background(), asynq.NewTask("spin", nil)); err != nil {
		t.Fatal(err)
	}
	now := time.Now()
	if now.Sub(reset) >= sampleDelay {
		t.Skipf("the task ended %s after the sample, past the next one; the machine is too slow for this test", now.Sub(reset))
	}

	used := time.Duration(q.cpu.finishedSince.Load())
	sampledAt := q.cpu.base.Add(time.Duration(q.cpu.sampledAt.Load()))
	actual := used.Seconds() / now.Sub(reset).Seconds()
	projected := q.projectedCores(now)
	// The rate of the tasks finished since the sample is part of the
	// projection. Measured from the sample's real time it is close to the
	// task's rate. From a time one slow process sample earlier it would be
	// a fraction of it.
	if projected < 0.8*actual {
		t.Errorf("projected CPU = %.2f cores right after a task used %v in the %v since the CPU sample (%.2f cores), "+
			"want at least 0.8 of that; sampledAt is %v before the sample was seen",
			projected, used, now.Sub(reset).Round(time.Millisecond), actual, reset.Sub(sampledAt).Round(time.Millisecond))
	}
}
