package asynqlimit

import (
	"context"
	"log/slog"
	"maps"
	"strings"
	"testing"
	"time"

	"github.com/hibiken/asynq"
	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/testutil"
	dto "github.com/prometheus/client_model/go"
	"golang.org/x/time/rate"
)

func TestMetricsExistAtZero(t *testing.T) {
	reg := prometheus.NewRegistry()
	l, err := New(Limits{
		Queues:  map[string]Budget{"critical": {Concurrency: 4}, "low": {Concurrency: 1}},
		Default: Budget{Concurrency: 2},
	}, WithRegisterer(reg))
	if err != nil {
		t.Fatal(err)
	}
	defer l.Close()

	const labels = 3 // critical, low, other
	tests := []struct {
		name string
		want int
	}{
		{"asynqlimit_tasks_in_flight", labels},
		{"asynqlimit_tasks_total", labels * int(numOutcomes)},
		{"asynqlimit_deferrals_total", labels * len(allReasons)},
		{"asynqlimit_rejections_total", labels},
		{"asynqlimit_waits_total", labels},
		{"asynqlimit_timeouts_total", labels},
		{"asynqlimit_queue_memory_reserved_bytes", labels},
		{"asynqlimit_queue_memory_budget_bytes", labels},
		{"asynqlimit_preemptions_total", labels},
		{"asynqlimit_task_cpu_seconds", labels},
		{"asynqlimit_queue_cpu_cores", labels},
		{"asynqlimit_queue_cpu_budget_cores", labels},
		{"asynqlimit_task_duration_seconds", labels},
		{"asynqlimit_abandoned_tasks", labels},
		{"asynqlimit_queue_concurrency_limit", labels},
	}
	for _, tt := range tests {
		if got := testutil.CollectAndCount(reg, tt.name); got != tt.want {
			t.Errorf("series of %s = %d, want %d", tt.name, got, tt.want)
		}
	}
	for queue, want := range map[string]float64{"critical": 4, "low": 1, "other": 2} {
		if got := testutil.ToFloat64(l.metrics.concurrency.WithLabelValues(queue)); got != want {
			t.Errorf("queue_concurrency_limit{queue=%q} = %v, want %v", queue, got, want)
		}
	}
}

func TestMetricsNotRegisteredWithoutRegisterer(t *testing.T) {
	l, err := New(Limits{Queues: map[string]Budget{"q": {Concurrency: 1}}})
	if err != nil {
		t.Fatal(err)
	}
	defer l.Close()
	families, err := prometheus.DefaultGatherer.Gather()
	if err != nil {
		t.Fatal(err)
	}
	for _, f := range families {
		if strings.HasPrefix(f.GetName(), "asynqlimit_") {
			t.Errorf("global registry has %s, want no asynqlimit metric", f.GetName())
		}
	}
}

func TestMetricsRegisterTwiceFails(t *testing.T) {
	reg := prometheus.NewRegistry()
	first, err := New(Limits{}, WithRegisterer(reg))
	if err != nil {
		t.Fatal(err)
	}
	defer first.Close()
	_, err = New(Limits{}, WithRegisterer(reg))
	if err == nil || !strings.Contains(err.Error(), "register metrics") {
		t.Errorf("second New on the same registry: error %v, want a registration error", err)
	}
}

func TestUnnamedQueuesShareOtherLabel(t *testing.T) {
	h := newHarness(t, Limits{Queues: map[string]Budget{"named": {}}}, asynq.Config{
		Queues: map[string]int{"named": 1, "x1": 1, "x2": 1},
	})
	for _, q := range []string{"named", "x1", "x2"} {
		h.enqueue(q, "work", nil)
	}
	h.start(asynq.HandlerFunc(func(context.Context, *asynq.Task) error { return nil }))
	for _, q := range []string{"named", "x1", "x2"} {
		h.waitSettled(q, 10*time.Second)
	}

	if got := h.outcome("other", OutcomeSucceeded); got != 2 {
		t.Errorf("tasks_total{queue=other,succeeded} = %v, want 2", got)
	}
	if got := h.outcome("named", OutcomeSucceeded); got != 1 {
		t.Errorf("tasks_total{queue=named,succeeded} = %v, want 1", got)
	}
	for _, name := range []string{"x1", "x2"} {
		if n := seriesWithLabel(t, h.reg, "queue", name); n != 0 {
			t.Errorf("%d series have queue=%q, want 0 for an unnamed queue", n, name)
		}
	}
}

func TestQueueMetricsFromInspector(t *testing.T) {
	h := newHarness(t, Limits{Queues: map[string]Budget{"q": {}}}, asynq.Config{Queues: map[string]int{"q": 1}})
	for range 3 {
		h.enqueue("q", "work", nil)
	}
	h.start(asynq.HandlerFunc(func(context.Context, *asynq.Task) error { return nil }))
	h.waitSettled("q", 10*time.Second)

	// The harness reads the queues at most every 50ms; poll until a reading
	// after the tasks completed is served.
	waitFor(t, 5*time.Second, func() bool {
		return gaugeValue(t, h.reg, "asynqlimit_queue_tasks", map[string]string{"queue": "q", "state": "completed"}) == 3
	}, func() string {
		return "asynqlimit_queue_tasks{queue=q,state=completed} never reached 3"
	})
	if got := gaugeValue(t, h.reg, "asynqlimit_queue_tasks", map[string]string{"queue": "q", "state": "pending"}); got != 0 {
		t.Errorf("asynqlimit_queue_tasks{queue=q,state=pending} = %v, want 0", got)
	}
}

// seriesWithLabel counts the series of every metric in g that have the
// label name with value.
func seriesWithLabel(t *testing.T, g prometheus.Gatherer, name, value string) int {
	t.Helper()
	families, err := g.Gather()
	if err != nil {
		t.Fatal(err)
	}
	n := 0
	for _, f := range families {
		for _, m := range f.GetMetric() {
			for _, lp := range m.GetLabel() {
				if lp.GetName() == name && lp.GetValue() == value {
					n++
				}
			}
		}
	}
	return n
}

// gaugeValue returns the value of the gauge series of name with exactly
// labels, or -1 when there is none.
func gaugeValue(t *testing.T, g prometheus.Gatherer, name string, labels map[string]string) float64 {
	t.Helper()
	if m := findSeries(t, g, name, labels); m != nil {
		return m.GetGauge().GetValue()
	}
	return -1
}

// findSeries returns the series of name with exactly labels, or nil.
func findSeries(t *testing.T, g prometheus.Gatherer, name string, labels map[string]string) *dto.Metric {
	t.Helper()
	families, err := g.Gather()
	if err != nil {
		t.Fatal(err)
	}
	for _, f := range families {
		if f.GetName() != name {
			continue
		}
		for _, m := range f.GetMetric() {
			got := map[string]string{}
			for _, lp := range m.GetLabel() {
				got[lp.GetName()] = lp.GetValue()
			}
			if maps.Equal(got, labels) {
				return m
			}
		}
	}
	return nil
}

func TestLogRateLimit(t *testing.T) {
	logs := &syncBuffer{}
	logger := slog.New(slog.NewTextHandler(logs, nil))
	l, err := New(Limits{Default: Budget{MaxPayload: 1}, Mode: Observe}, WithLogger(logger), WithLogRate(time.Hour, 2))
	if err != nil {
		t.Fatal(err)
	}
	h := l.Middleware()(asynq.HandlerFunc(func(context.Context, *asynq.Task) error { return nil }))
	for range 5 {
		if err := h.ProcessTask(context.Background(), asynq.NewTask("t", []byte("hidden-payload"))); err != nil {
			t.Fatal(err)
		}
	}
	l.queue("").logs[1].SetLimit(rate.Inf) // let the next line through to report the suppressed count
	if err := h.ProcessTask(context.Background(), asynq.NewTask("t", []byte("hidden-payload"))); err != nil {
		t.Fatal(err)
	}

	out := logs.String()
	if n := strings.Count(out, "task rejected"); n != 3 {
		t.Errorf("log lines = %d, want 3 (a burst of 2, then 1 after the limit was raised):\n%s", n, out)
	}
	if !strings.Contains(out, "suppressed=3") {
		t.Errorf("logs do not count the 3 suppressed lines:\n%s", out)
	}
	if strings.Contains(out, "hidden-payload") {
		t.Errorf("logs contain the payload:\n%s", out)
	}
	for _, want := range []string{"payload_bytes=14", "max_payload_bytes=1", "mode=observe", "task_type=t"} {
		if !strings.Contains(out, want) {
			t.Errorf("logs lack %q:\n%s", want, out)
		}
	}
}

func TestLogRateLimitKeepsWarnings(t *testing.T) {
	logs := &syncBuffer{}
	l, err := New(Limits{}, WithLogger(slog.New(slog.NewTextHandler(logs, nil))), WithLogRate(time.Hour, 2))
	if err != nil {
		t.Fatal(err)
	}
	q, task, ctx := l.queue("q"), asynq.NewTask("t", nil), context.Background()
	for range 5 {
		l.logEvent(ctx, q, task, slog.LevelInfo, "info event")
	}
	l.logEvent(ctx, q, task, slog.LevelWarn, "warning event")

	out := logs.String()
	if n := strings.Count(out, "info event"); n != 2 {
		t.Errorf("info lines = %d, want the burst of 2:\n%s", n, out)
	}
	if n := strings.Count(out, "warning event"); n != 1 {
		t.Errorf("warning lines = %d, want 1 after an info flood:\n%s", n, out)
	}
}
