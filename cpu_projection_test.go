package asynqlimit

import (
	"context"
	"math"
	"sync"
	"testing"
	"time"

	"github.com/hibiken/asynq"
	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/testutil"
)

// newSampledCPULimiter returns a Limiter with a CPU budget on the default
// queue whose monitor never ticks by itself, so the test calls sampleCPU.
func newSampledCPULimiter(t *testing.T, cores float64) *Limiter {
	t.Helper()
	l, err := New(Limits{Default: Budget{CPU: cores}},
		WithRegisterer(prometheus.NewRegistry()), WithSampleInterval(time.Hour), WithCPUWindow(time.Second))
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { l.Close() })
	return l
}

// sampleEvery calls l.sampleCPU every interval until stop is closed, from
// one goroutine, as the monitor would.
func sampleEvery(l *Limiter, interval time.Duration, stop <-chan struct{}) *sync.WaitGroup {
	var wg sync.WaitGroup
	wg.Add(1)
	go func() {
		defer wg.Done()
		ticker := time.NewTicker(interval)
		defer ticker.Stop()
		for {
			select {
			case <-stop:
				return
			case <-ticker.C:
				l.sampleCPU()
			}
		}
	}()
	return &wg
}

// A finished task adds to the projection only the CPU time it used after
// the last sample, because the samples taken while it ran counted the rest.
func TestCPUProjectionAfterLongTask(t *testing.T) {
	skipWithoutThreadCPU(t)
	l := newSampledCPULimiter(t, 2)
	q := l.queue("")
	l.sampleCPU()

	stop := make(chan struct{})
	wg := sampleEvery(l, 250*time.Millisecond, stop)
	h := l.Middleware()(asynq.HandlerFunc(func(ctx context.Context, _ *asynq.Task) error {
		// Not a multiple of the sample interval, so that the task does not
		// finish right before a sample.
		return spin(ctx, 1400*time.Millisecond)
	}))
	if err := h.ProcessTask(context.Background(), asynq.NewTask("long", nil)); err != nil {
		t.Fatal(err)
	}
	close(stop)
	wg.Wait()

	// One task ran at a time, so the queue never used more than 1 core, and
	// at most one sample interval of its CPU time is newer than the last
	// sample.
	if got := q.projectedCores(time.Now()); got >= 1.5 {
		t.Errorf("projected CPU right after a 1-core task finished = %.2f cores, want < 1.5 (nothing runs now)", got)
	}
	runTasks(t, l, 1)
	if got := testutil.ToFloat64(q.metrics.deferrals[ReasonCPU]); got != 0 {
		t.Errorf("deferrals{cpu} of a task started after the only running task finished = %v, want 0 under a 2-core budget", got)
	}
}

// Tasks run one at a time use at most 1 core, which the projection must
// not count twice through the last interval's rate and the rate of the
// tasks finished since.
func TestCPUProjectionOfShortTasks(t *testing.T) {
	skipWithoutThreadCPU(t)
	l := newSampledCPULimiter(t, 1.15)
	q := l.queue("")
	l.sampleCPU()

	stop := make(chan struct{})
	wg := sampleEvery(l, DefaultSampleInterval, stop)
	h := l.Middleware()(asynq.HandlerFunc(func(ctx context.Context, _ *asynq.Task) error {
		return spin(ctx, 10*time.Millisecond)
	}))
	maxProjected := 0.0
	for end := time.Now().Add(2 * time.Second); time.Now().Before(end); {
		maxProjected = max(maxProjected, q.projectedCores(time.Now()))
		if err := h.ProcessTask(context.Background(), asynq.NewTask("short", nil)); err != nil {
			t.Fatal(err)
		}
	}
	close(stop)
	wg.Wait()

	// Without asynq's metadata each task is on its last attempt, so it runs
	// and a deferral is only counted. Under asynq each would be deferred.
	if got := testutil.ToFloat64(q.metrics.deferrals[ReasonCPU]); got != 0 {
		t.Errorf("deferrals{cpu} = %v for tasks run one at a time (at most 1 core) under a 1.15-core budget, want 0; "+
			"highest projection %.2f cores", got, maxProjected)
	}
}

// The unnamed queues share the gauge of the "other" label, which shows the
// sum of their use.
func TestOtherCPUGaugeSumsQueues(t *testing.T) {
	skipWithoutThreadCPU(t)
	reg := prometheus.NewRegistry()
	l, err := New(Limits{Default: Budget{CPU: 8}},
		WithRegisterer(reg), WithSampleInterval(time.Hour), WithCPUWindow(time.Second))
	if err != nil {
		t.Fatal(err)
	}
	defer l.Close()
	h := asynq.HandlerFunc(func(ctx context.Context, _ *asynq.Task) error {
		return spin(ctx, 600*time.Millisecond)
	})

	for _, name := range []string{"x", "y"} {
		l.queue(name) // two queues under the Default budget
	}
	l.sampleCPU()
	var wg sync.WaitGroup
	for _, name := range []string{"x", "y"} {
		wg.Add(1)
		go func() {
			defer wg.Done()
			// The middleware takes the queue name from asynq's metadata,
			// which a test cannot set, so the run starts on the queue's
			// state directly, as enter does after admission.
			ctx := context.Background()
			r := l.start(ctx, l.queue(name), asynq.NewTask("spin", nil), h, grant{})
			_ = finishRun(l, r, ctx)
		}()
	}
	time.Sleep(500 * time.Millisecond)
	l.sampleCPU()
	wg.Wait()

	sum := l.queue("x").usedCores() + l.queue("y").usedCores()
	got := gaugeValue(t, reg, "asynqlimit_queue_cpu_cores", map[string]string{"queue": otherLabel})
	if l.queue("x").usedCores() <= 0 || l.queue("y").usedCores() <= 0 {
		t.Fatalf("queue use x %.2f, y %.2f cores, want both > 0: the spinning tasks were not measured",
			l.queue("x").usedCores(), l.queue("y").usedCores())
	}
	if math.Abs(got-sum) > 1e-9 {
		t.Errorf("queue_cpu_cores{other} = %.3f, want the sum of the unnamed queues' use, %.3f (x %.3f, y %.3f)",
			got, sum, l.queue("x").usedCores(), l.queue("y").usedCores())
	}
}
