package asynqlimit

import (
	"context"
	"errors"
	"log/slog"
	"math"
	"os"
	"runtime/debug"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/hibiken/asynq"
	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/testutil"

	"github.com/asynqlimit/asynqlimit/internal/resource"
)

// fakeSampler returns the sample set last, or err.
type fakeSampler struct {
	mu     sync.Mutex
	sample ResourceSample
	err    error
}

func (f *fakeSampler) Sample() (ResourceSample, error) {
	f.mu.Lock()
	defer f.mu.Unlock()
	return f.sample, f.err
}

func (f *fakeSampler) set(rss int64, err error) {
	f.mu.Lock()
	defer f.mu.Unlock()
	f.sample.RSS, f.sample.At, f.err = rss, time.Now(), err
}

var testDetected = resource.Limits{MemoryBytes: 1000, MemorySource: "test", CPUCores: 4, CPUSource: "test"}

// newMonitoredLimiter returns a Limiter whose monitor never ticks by
// itself: tests drive it with step.
func newMonitoredLimiter(t *testing.T, limits Limits, opts ...Option) (*Limiter, *fakeSampler, *prometheus.Registry) {
	t.Helper()
	sampler, reg := &fakeSampler{}, prometheus.NewRegistry()
	opts = append([]Option{WithSampler(sampler), WithSampleInterval(time.Hour), withDetectedLimits(testDetected),
		WithRegisterer(reg)}, opts...)
	l, err := New(limits, opts...)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { l.Close() })
	return l, sampler, reg
}

func threeQueues(p ProcessLimits) Limits {
	return Limits{
		Queues: map[string]Budget{
			"low":  {Priority: 0},
			"mid":  {Priority: 1},
			"high": {Priority: 2},
		},
		Process: p,
	}
}

func TestMonitorShedsLadder(t *testing.T) {
	l, _, _ := newMonitoredLimiter(t, threeQueues(ProcessLimits{MemorySoft: 100, MemoryHard: 500, Grace: time.Second}))
	m := l.monitor
	start := time.Unix(1000, 0)
	steps := []struct {
		after time.Duration
		rss   int64
		shed  map[int]bool
	}{
		{0, 50, map[int]bool{0: false, 1: false, 2: false}},
		{250 * time.Millisecond, 150, map[int]bool{0: false}},                    // above soft, within grace
		{1250 * time.Millisecond, 150, map[int]bool{0: true, 1: false}},          // soft: lowest shed
		{1500 * time.Millisecond, 150, map[int]bool{0: true, 1: true, 2: false}}, // widened
		{1750 * time.Millisecond, 150, map[int]bool{1: true, 2: false}},          // highest never shed
		{2000 * time.Millisecond, 90, map[int]bool{1: true}},                     // below 95: fall starts
		{3000 * time.Millisecond, 90, map[int]bool{0: true, 1: false}},           // none: narrows
		{3250 * time.Millisecond, 90, map[int]bool{0: false}},
	}
	for _, s := range steps {
		m.step(ResourceSample{RSS: s.rss}, nil, start.Add(s.after))
		for priority, want := range s.shed {
			if got := m.sheds(priority, 0); got != want {
				t.Fatalf("at +%s with RSS %d: sheds(%d) = %v, want %v", s.after, s.rss, priority, got, want)
			}
		}
	}
}

func TestMonitorSamplerErrorKeepsDecision(t *testing.T) {
	l, _, reg := newMonitoredLimiter(t, threeQueues(ProcessLimits{MemorySoft: 100, Grace: time.Nanosecond}))
	m := l.monitor
	now := time.Unix(1000, 0)
	m.step(ResourceSample{RSS: 200}, nil, now)
	m.step(ResourceSample{RSS: 200}, nil, now.Add(time.Second))
	if !m.sheds(0, 0) {
		t.Fatal("sheds(0) = false under soft pressure")
	}

	m.step(ResourceSample{}, errors.New("read /proc: permission denied"), now.Add(2*time.Second))
	if !m.sheds(0, 0) {
		t.Errorf("sheds(0) = false after a failed sample, want the last decision kept")
	}
	if got := testutil.ToFloat64(m.metrics.samplerErrors); got != 1 {
		t.Errorf("sampler_errors_total = %v, want 1", got)
	}
	if got := gaugeValue(t, reg, "asynqlimit_pressure", map[string]string{"resource": "memory"}); got != float64(PressureSoft) {
		t.Errorf("asynqlimit_pressure{resource=memory} = %v, want 1", got)
	}
}

func TestMonitorMetrics(t *testing.T) {
	l, _, reg := newMonitoredLimiter(t, threeQueues(ProcessLimits{
		MemorySoftFraction: 0.5, MemoryHardFraction: 0.9, CPUSoft: 1, CPUHardFraction: 0.75,
	}))
	m := l.monitor
	now := time.Unix(1000, 0)
	m.step(ResourceSample{At: now, RSS: 950, CPUTime: 0}, nil, now)
	m.step(ResourceSample{At: now.Add(time.Second), RSS: 950, CPUTime: 3500 * time.Millisecond}, nil, now.Add(time.Second))

	for labels, want := range map[[2]string]float64{
		{"memory", "soft"}: 500, {"memory", "hard"}: 900, {"cpu", "soft"}: 1, {"cpu", "hard"}: 3,
	} {
		got := gaugeValue(t, reg, "asynqlimit_process_limit", map[string]string{"resource": labels[0], "threshold": labels[1]})
		if got != want {
			t.Errorf("process_limit{%s,%s} = %v, want %v", labels[0], labels[1], got, want)
		}
	}
	if got := testutil.ToFloat64(m.metrics.rss); got != 950 {
		t.Errorf("process_resident_memory_bytes = %v, want 950", got)
	}
	if got := testutil.ToFloat64(m.metrics.cpu); got != 3.5 {
		t.Errorf("process_cpu_cores = %v, want 3.5", got)
	}
	for _, r := range []string{"memory", "cpu"} {
		if got := gaugeValue(t, reg, "asynqlimit_pressure", map[string]string{"resource": r}); got != float64(PressureHard) {
			t.Errorf("pressure{resource=%s} = %v, want 2 (hard)", r, got)
		}
	}
}

func TestMonitorStopsOnClose(t *testing.T) {
	sampler := &fakeSampler{}
	l, err := New(threeQueues(ProcessLimits{MemoryHard: 100}), WithSampler(sampler),
		WithSampleInterval(time.Millisecond), withDetectedLimits(testDetected))
	if err != nil {
		t.Fatal(err)
	}
	sampler.set(500, nil)
	waitFor(t, 5*time.Second, func() bool { return l.monitor.memoryLevel.Load() == int32(PressureHard) },
		func() string { return "the monitor goroutine never sampled hard pressure" })
	if err := l.Close(); err != nil {
		t.Fatal(err)
	}
	select {
	case <-l.monitor.done:
	default:
		t.Error("monitor goroutine still running after Close")
	}
}

func TestPressureShedsLowQueue(t *testing.T) {
	sampler := &fakeSampler{}
	sampler.set(0, nil)
	h := newHarness(t, threeQueues(ProcessLimits{MemorySoft: 100, Grace: time.Nanosecond}), asynq.Config{
		Concurrency: 4,
		Queues:      map[string]int{"low": 1, "mid": 1, "high": 1},
	}, WithSampler(sampler), WithSampleInterval(20*time.Millisecond), withDetectedLimits(testDetected),
		WithoutGate()) // the test needs deferrals, which the gate avoids
	m := h.srv.limiter.monitor
	sampler.set(200, nil)
	waitFor(t, 5*time.Second, func() bool { return m.sheds(0, 0) },
		func() string { return "soft pressure never shed priority 0" })

	low := h.enqueue("low", "work", nil, asynq.MaxRetry(3))
	high := h.enqueue("high", "work", nil, asynq.MaxRetry(3))
	h.start(asynq.HandlerFunc(func(context.Context, *asynq.Task) error { return nil }))
	waitFor(t, 10*time.Second, func() bool { return h.taskInfo("high", high.ID).State == asynq.TaskStateCompleted },
		func() string { return "high-priority task did not complete under soft pressure" })
	waitFor(t, 10*time.Second, func() bool { return h.deferrals("low", ReasonPressure) > 0 },
		func() string { return "low-priority task was not deferred under soft pressure" })
	if got := h.taskInfo("low", low.ID).State; got == asynq.TaskStateCompleted {
		t.Errorf("low-priority task completed under soft pressure, want it deferred")
	}

	sampler.set(10, nil)
	waitFor(t, 15*time.Second, func() bool { return h.taskInfo("low", low.ID).State == asynq.TaskStateCompleted },
		func() string { return "low-priority task did not complete after pressure ended" })
	if got := h.taskInfo("low", low.ID).Retried; got != 0 {
		t.Errorf("low task Retried = %d, want 0 after pressure deferrals", got)
	}
}

func TestMonitorCountsPendingReservations(t *testing.T) {
	l, _, _ := newMonitoredLimiter(t, threeQueues(ProcessLimits{MemorySoft: 100, MemoryHard: 500}))
	m := l.monitor
	m.step(ResourceSample{RSS: 50}, nil, time.Unix(1000, 0))

	if m.sheds(0, 30) {
		t.Fatalf("sheds(0, 30) at RSS 50 = true, want false: 80 is below the soft 100")
	}
	m.pending.add(30) // one running task that the sample does not show
	if !m.sheds(0, 30) {
		t.Errorf("sheds(0, 30) with 30 pending = false, want true: 50+30+30 reaches the soft 100")
	}
	if m.sheds(1, 30) {
		t.Errorf("sheds(1, 30) = true, want only the lowest priority shed below the hard threshold")
	}
	if !m.sheds(1, 420) || m.sheds(2, 420) {
		t.Errorf("sheds(1, 420), sheds(2, 420) = %v, %v; want true, false: reaching hard sheds all but the highest",
			m.sheds(1, 420), m.sheds(2, 420))
	}

	m.step(ResourceSample{RSS: 50}, nil, time.Unix(1001, 0))
	if !m.sheds(0, 30) {
		t.Errorf("sheds(0, 30) after a sample without growth = false, want true: the task has not allocated yet")
	}
	m.step(ResourceSample{RSS: 70}, nil, time.Unix(1002, 0))
	if got := m.pending.total(); got != 10 {
		t.Errorf("pending after the memory grew by 20 = %d, want 10", got)
	}
	m.step(ResourceSample{RSS: 90}, nil, time.Unix(1003, 0))
	if got := m.pending.total(); got != 0 {
		t.Errorf("pending after the memory grew by 20 more = %d, want 0, never below", got)
	}
	if m.sheds(0, 5) {
		t.Errorf("sheds(0, 5) at RSS 90 with nothing pending = true, want false: 95 is below the soft 100")
	}
}

func TestSetGoMemoryLimit(t *testing.T) {
	if os.Getenv("GOMEMLIMIT") != "" || debug.SetMemoryLimit(-1) != math.MaxInt64 {
		t.Skip("a Go memory limit is set already")
	}
	l, _, _ := newMonitoredLimiter(t, threeQueues(ProcessLimits{MemorySoft: 3 << 30, SetGoMemoryLimit: true}))
	if got := debug.SetMemoryLimit(-1); got != 3<<30 {
		t.Errorf("Go memory limit = %d, want the soft threshold %d", got, int64(3<<30))
	}
	l.Close()
	if got := debug.SetMemoryLimit(-1); got != math.MaxInt64 {
		t.Errorf("Go memory limit after Close = %d, want it restored to no limit", got)
	}
}

func TestSampleErrorLogIsRateLimited(t *testing.T) {
	logs := &syncBuffer{}
	l, _, _ := newMonitoredLimiter(t, threeQueues(ProcessLimits{MemorySoft: 100}),
		WithLogger(slog.New(slog.NewTextHandler(logs, nil))))
	failure := errors.New("read /proc: permission denied")
	start := time.Unix(1000, 0)
	for i := range 5 {
		l.monitor.step(ResourceSample{}, failure, start.Add(time.Duration(i)*time.Second))
	}
	if got := strings.Count(logs.String(), "sampling the process failed"); got != 1 {
		t.Errorf("log lines of 5 failures within a minute = %d, want 1:\n%s", got, logs)
	}

	l.monitor.step(ResourceSample{}, failure, start.Add(sampleErrorLogEvery))
	if got := strings.Count(logs.String(), "sampling the process failed"); got != 2 {
		t.Errorf("log lines after a minute = %d, want 2", got)
	}
	if !strings.Contains(logs.String(), "failures_since_last_log=5") {
		t.Errorf("second line does not count the 5 failures since the first:\n%s", logs)
	}
}

func TestSetGoMemoryLimitWithoutSoftThresholdWarns(t *testing.T) {
	logs := &syncBuffer{}
	newMonitoredLimiter(t, threeQueues(ProcessLimits{MemoryHard: 500, SetGoMemoryLimit: true}),
		WithLogger(slog.New(slog.NewTextHandler(logs, nil))))
	if !strings.Contains(logs.String(), "level=WARN msg=\"asynqlimit: SetGoMemoryLimit has no effect without a soft memory threshold") {
		t.Errorf("log has no warning about SetGoMemoryLimit without MemorySoft:\n%s", logs)
	}
}
