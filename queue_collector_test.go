package asynqlimit

import (
	"bytes"
	"errors"
	"log/slog"
	"slices"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/alicebob/miniredis/v2"
	"github.com/hibiken/asynq"
	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/testutil"
)

const (
	queueTasksHeader = `# HELP asynqlimit_queue_tasks Number of tasks in asynq queues by state, read through the asynq inspector. Queues that share a queue label are summed.
# TYPE asynqlimit_queue_tasks gauge
`
	queueLatencyHeader = `# HELP asynqlimit_queue_latency_seconds Age in seconds of the oldest pending task in asynq queues. Queues that share a queue label report the maximum.
# TYPE asynqlimit_queue_latency_seconds gauge
`
	queuePausedHeader = `# HELP asynqlimit_queue_paused Whether asynq queues are paused (1) or not (0). Queues that share a queue label report 1 if any of them is paused.
# TYPE asynqlimit_queue_paused gauge
`
	queueInspectErrorsHeader = `# HELP asynqlimit_queue_inspect_errors_total Number of failed reads of asynq queues through the asynq inspector.
# TYPE asynqlimit_queue_inspect_errors_total counter
`
)

// fakeQueueInspector serves fixed queue infos and counts inspector rounds.
type fakeQueueInspector struct {
	mu        sync.Mutex
	infos     map[string]*asynq.QueueInfo
	queuesErr error
	infoErr   error
	rounds    int
	// queuesDelay is how long Queues sleeps, to let concurrent scrapes overlap.
	queuesDelay time.Duration
}

func (f *fakeQueueInspector) Queues() ([]string, error) {
	time.Sleep(f.queuesDelay)

	f.mu.Lock()
	defer f.mu.Unlock()

	f.rounds++
	if f.queuesErr != nil {
		return nil, f.queuesErr
	}
	queues := make([]string, 0, len(f.infos))
	for queue := range f.infos {
		queues = append(queues, queue)
	}
	slices.Sort(queues)
	return queues, nil
}

func (f *fakeQueueInspector) GetQueueInfo(queue string) (*asynq.QueueInfo, error) {
	f.mu.Lock()
	defer f.mu.Unlock()

	if f.infoErr != nil {
		return nil, f.infoErr
	}
	info, ok := f.infos[queue]
	if !ok {
		return nil, errors.New("queue not found")
	}
	copied := *info
	return &copied, nil
}

func (f *fakeQueueInspector) set(infos map[string]*asynq.QueueInfo, queuesErr, infoErr error) {
	f.mu.Lock()
	defer f.mu.Unlock()

	f.infos = infos
	f.queuesErr = queuesErr
	f.infoErr = infoErr
}

func (f *fakeQueueInspector) roundCount() int {
	f.mu.Lock()
	defer f.mu.Unlock()

	return f.rounds
}

// queueTestClock is a manual clock for the collector's cache.
type queueTestClock struct {
	mu  sync.Mutex
	now time.Time
}

func (c *queueTestClock) Now() time.Time {
	c.mu.Lock()
	defer c.mu.Unlock()

	return c.now
}

func (c *queueTestClock) Advance(d time.Duration) {
	c.mu.Lock()
	defer c.mu.Unlock()

	c.now = c.now.Add(d)
}

// configuredQueueLabel keeps the given queue names and maps any other to "other".
func configuredQueueLabel(configured ...string) func(string) string {
	return func(queue string) string {
		if slices.Contains(configured, queue) {
			return queue
		}
		return "other"
	}
}

// newTestQueueCollector returns a collector on a manual clock that logs into
// the returned buffer.
func newTestQueueCollector(insp queueInspector, ttl time.Duration, configured ...string) (*queueCollector, *queueTestClock, *bytes.Buffer) {
	logs := &bytes.Buffer{}
	logger := slog.New(slog.NewTextHandler(logs, nil))
	collector := newQueueCollector(insp, configuredQueueLabel(configured...), ttl, logger)
	clock := &queueTestClock{now: time.Date(2025, 1, 2, 3, 4, 5, 0, time.UTC)}
	collector.now = clock.Now
	return collector, clock, logs
}

func TestQueueCollectorReportsQueues(t *testing.T) {
	tests := []struct {
		name       string
		configured []string
		infos      map[string]*asynq.QueueInfo
		want       string
	}{
		{
			name:       "configured queues keep names",
			configured: []string{"critical", "default"},
			infos: map[string]*asynq.QueueInfo{
				"critical": {Queue: "critical", Pending: 3, Active: 1, Scheduled: 2, Retry: 4, Archived: 5, Completed: 6, Aggregating: 7, Latency: 1500 * time.Millisecond},
				"default":  {Queue: "default", Pending: 10, Paused: true},
			},
			want: queueTasksHeader + `
asynqlimit_queue_tasks{queue="critical",state="active"} 1
asynqlimit_queue_tasks{queue="critical",state="aggregating"} 7
asynqlimit_queue_tasks{queue="critical",state="archived"} 5
asynqlimit_queue_tasks{queue="critical",state="completed"} 6
asynqlimit_queue_tasks{queue="critical",state="pending"} 3
asynqlimit_queue_tasks{queue="critical",state="retry"} 4
asynqlimit_queue_tasks{queue="critical",state="scheduled"} 2
asynqlimit_queue_tasks{queue="default",state="active"} 0
asynqlimit_queue_tasks{queue="default",state="aggregating"} 0
asynqlimit_queue_tasks{queue="default",state="archived"} 0
asynqlimit_queue_tasks{queue="default",state="completed"} 0
asynqlimit_queue_tasks{queue="default",state="pending"} 10
asynqlimit_queue_tasks{queue="default",state="retry"} 0
asynqlimit_queue_tasks{queue="default",state="scheduled"} 0
` + queueLatencyHeader + `
asynqlimit_queue_latency_seconds{queue="critical"} 1.5
asynqlimit_queue_latency_seconds{queue="default"} 0
` + queuePausedHeader + `
asynqlimit_queue_paused{queue="critical"} 0
asynqlimit_queue_paused{queue="default"} 1
` + queueInspectErrorsHeader + `
asynqlimit_queue_inspect_errors_total 0
`,
		},
		{
			name:       "unconfigured queues sum under other",
			configured: []string{"default"},
			infos: map[string]*asynq.QueueInfo{
				"default": {Queue: "default", Pending: 1, Latency: 30 * time.Second},
				"spam-a":  {Queue: "spam-a", Pending: 2, Active: 1, Scheduled: 3, Retry: 1, Archived: 2, Completed: 4, Aggregating: 1, Latency: 2 * time.Second},
				"spam-b":  {Queue: "spam-b", Pending: 5, Active: 2, Scheduled: 1, Retry: 3, Archived: 1, Completed: 1, Aggregating: 2, Latency: 7 * time.Second, Paused: true},
				"spam-c":  {Queue: "spam-c", Pending: 1, Latency: 4 * time.Second},
			},
			want: queueTasksHeader + `
asynqlimit_queue_tasks{queue="default",state="active"} 0
asynqlimit_queue_tasks{queue="default",state="aggregating"} 0
asynqlimit_queue_tasks{queue="default",state="archived"} 0
asynqlimit_queue_tasks{queue="default",state="completed"} 0
asynqlimit_queue_tasks{queue="default",state="pending"} 1
asynqlimit_queue_tasks{queue="default",state="retry"} 0
asynqlimit_queue_tasks{queue="default",state="scheduled"} 0
asynqlimit_queue_tasks{queue="other",state="active"} 3
asynqlimit_queue_tasks{queue="other",state="aggregating"} 3
asynqlimit_queue_tasks{queue="other",state="archived"} 3
asynqlimit_queue_tasks{queue="other",state="completed"} 5
asynqlimit_queue_tasks{queue="other",state="pending"} 8
asynqlimit_queue_tasks{queue="other",state="retry"} 4
asynqlimit_queue_tasks{queue="other",state="scheduled"} 4
` + queueLatencyHeader + `
asynqlimit_queue_latency_seconds{queue="default"} 30
asynqlimit_queue_latency_seconds{queue="other"} 7
` + queuePausedHeader + `
asynqlimit_queue_paused{queue="default"} 0
asynqlimit_queue_paused{queue="other"} 1
` + queueInspectErrorsHeader + `
asynqlimit_queue_inspect_errors_total 0
`,
		},
		{
			name:       "no queues",
			configured: []string{"default"},
			infos:      map[string]*asynq.QueueInfo{},
			want: queueInspectErrorsHeader + `
asynqlimit_queue_inspect_errors_total 0
`,
		},
	}

	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			insp := &fakeQueueInspector{infos: tt.infos}
			collector, _, _ := newTestQueueCollector(insp, time.Minute, tt.configured...)

			if err := testutil.CollectAndCompare(collector, strings.NewReader(tt.want)); err != nil {
				t.Errorf("unexpected metrics: %v", err)
			}
		})
	}
}

func TestQueueCollectorCache(t *testing.T) {
	const ttl = 10 * time.Second
	tests := []struct {
		name       string
		ttl        time.Duration
		elapsed    time.Duration
		wantRounds int
	}{
		{name: "same instant", ttl: ttl, elapsed: 0, wantRounds: 1},
		{name: "within ttl", ttl: ttl, elapsed: ttl / 2, wantRounds: 1},
		{name: "just under ttl", ttl: ttl, elapsed: ttl - time.Nanosecond, wantRounds: 1},
		{name: "at ttl", ttl: ttl, elapsed: ttl, wantRounds: 2},
		{name: "after ttl", ttl: ttl, elapsed: 3 * ttl, wantRounds: 2},
		{name: "zero ttl", ttl: 0, elapsed: 0, wantRounds: 2},
	}

	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			insp := &fakeQueueInspector{infos: map[string]*asynq.QueueInfo{
				"default": {Queue: "default", Pending: 1},
			}}
			collector, clock, _ := newTestQueueCollector(insp, tt.ttl, "default")

			testutil.CollectAndCount(collector)
			clock.Advance(tt.elapsed)
			testutil.CollectAndCount(collector)

			if got := insp.roundCount(); got != tt.wantRounds {
				t.Errorf("inspector rounds after two scrapes %v apart: got %d, want %d", tt.elapsed, got, tt.wantRounds)
			}
		})
	}
}

// pendingTaskLines returns the asynqlimit_queue_tasks samples of a queue label
// whose only tasks are pending ones.
func pendingTaskLines(queue, pending string) string {
	var lines strings.Builder
	for _, state := range []string{"active", "aggregating", "archived", "completed", "pending", "retry", "scheduled"} {
		count := "0"
		if state == "pending" {
			count = pending
		}
		lines.WriteString(`asynqlimit_queue_tasks{queue="` + queue + `",state="` + state + `"} ` + count + "\n")
	}
	return lines.String()
}

func TestQueueCollectorCacheExpiry(t *testing.T) {
	const ttl = 10 * time.Second
	insp := &fakeQueueInspector{infos: map[string]*asynq.QueueInfo{
		"critical": {Queue: "critical", Pending: 1},
		"default":  {Queue: "default", Pending: 2},
	}}
	collector, clock, _ := newTestQueueCollector(insp, ttl, "critical", "default")
	first := queueTasksHeader + pendingTaskLines("critical", "1") + pendingTaskLines("default", "2")
	if err := testutil.CollectAndCompare(collector, strings.NewReader(first), "asynqlimit_queue_tasks"); err != nil {
		t.Fatalf("first scrape: unexpected metrics: %v", err)
	}

	// Queue "default" is deleted and "critical" grows.
	insp.set(map[string]*asynq.QueueInfo{
		"critical": {Queue: "critical", Pending: 5},
	}, nil, nil)

	clock.Advance(ttl / 2)
	if err := testutil.CollectAndCompare(collector, strings.NewReader(first), "asynqlimit_queue_tasks"); err != nil {
		t.Errorf("scrape within ttl: unexpected metrics, want the cached reading: %v", err)
	}

	clock.Advance(ttl)
	second := queueTasksHeader + pendingTaskLines("critical", "5")
	if err := testutil.CollectAndCompare(collector, strings.NewReader(second), "asynqlimit_queue_tasks"); err != nil {
		t.Errorf("scrape after ttl: unexpected metrics, want the new reading: %v", err)
	}
	if got, want := testutil.CollectAndCount(collector, "asynqlimit_queue_latency_seconds"), 1; got != want {
		t.Errorf("latency series after queue deletion: got %d, want %d", got, want)
	}
	if got, want := testutil.CollectAndCount(collector, "asynqlimit_queue_paused"), 1; got != want {
		t.Errorf("paused series after queue deletion: got %d, want %d", got, want)
	}
}

func TestQueueCollectorConcurrentScrapes(t *testing.T) {
	insp := &fakeQueueInspector{
		infos: map[string]*asynq.QueueInfo{
			"default": {Queue: "default", Pending: 1},
		},
		queuesDelay: 20 * time.Millisecond,
	}
	collector, _, _ := newTestQueueCollector(insp, time.Minute, "default")
	registry := prometheus.NewPedanticRegistry()
	registry.MustRegister(collector)

	const scrapers = 16
	var wg sync.WaitGroup
	for range scrapers {
		wg.Go(func() {
			if _, err := registry.Gather(); err != nil {
				t.Errorf("gather: %v", err)
			}
		})
	}
	wg.Wait()

	if got, want := insp.roundCount(), 1; got != want {
		t.Errorf("inspector rounds after %d concurrent scrapes: got %d, want %d", scrapers, got, want)
	}
}

func TestQueueCollectorInspectorError(t *testing.T) {
	const ttl = 10 * time.Second
	inspectErr := errors.New("dial tcp 127.0.0.1:6379: connection refused")
	tests := []struct {
		name      string
		queuesErr error
		infoErr   error
	}{
		{name: "queues fails", queuesErr: inspectErr},
		{name: "queue info fails", infoErr: inspectErr},
	}

	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			infos := map[string]*asynq.QueueInfo{
				"default": {Queue: "default", Pending: 2, Latency: 3 * time.Second},
			}
			insp := &fakeQueueInspector{infos: infos}
			collector, clock, logs := newTestQueueCollector(insp, ttl, "default")
			testutil.CollectAndCount(collector)

			insp.set(infos, tt.queuesErr, tt.infoErr)
			clock.Advance(ttl)
			want := queueTasksHeader + pendingTaskLines("default", "2") + queueLatencyHeader + `
asynqlimit_queue_latency_seconds{queue="default"} 3
` + queuePausedHeader + `
asynqlimit_queue_paused{queue="default"} 0
` + queueInspectErrorsHeader + `
asynqlimit_queue_inspect_errors_total 1
`
			if err := testutil.CollectAndCompare(collector, strings.NewReader(want)); err != nil {
				t.Errorf("scrape after failed round: unexpected metrics, want the last reading and one error: %v", err)
			}
			if got := logs.String(); !strings.Contains(got, inspectErr.Error()) {
				t.Errorf("log output: got %q, want it to contain %q", got, inspectErr.Error())
			}
			if got, want := strings.Count(logs.String(), "\n"), 1; got != want {
				t.Errorf("log records: got %d, want %d", got, want)
			}

			// The failed round is cached, so a scrape within ttl neither
			// retries nor counts another error.
			clock.Advance(ttl / 2)
			if err := testutil.CollectAndCompare(collector, strings.NewReader(want)); err != nil {
				t.Errorf("scrape within ttl of failed round: unexpected metrics: %v", err)
			}
			if got, want := insp.roundCount(), 2; got != want {
				t.Errorf("inspector rounds: got %d, want %d", got, want)
			}
		})
	}
}

func TestQueueCollectorErrorWithoutReading(t *testing.T) {
	insp := &fakeQueueInspector{queuesErr: errors.New("connection refused")}
	collector, _, logs := newTestQueueCollector(insp, time.Minute, "default")

	want := queueInspectErrorsHeader + `
asynqlimit_queue_inspect_errors_total 1
`
	if err := testutil.CollectAndCompare(collector, strings.NewReader(want)); err != nil {
		t.Errorf("unexpected metrics, want only the error counter: %v", err)
	}
	if got, want := logs.String(), "has_previous_reading=false"; !strings.Contains(got, want) {
		t.Errorf("log output: got %q, want it to contain %q", got, want)
	}
}

func TestQueueCollectorInvalidLabel(t *testing.T) {
	insp := &fakeQueueInspector{infos: map[string]*asynq.QueueInfo{
		"default": {Queue: "default", Pending: 1},
	}}
	collector := newQueueCollector(insp, func(string) string { return "\xff" }, time.Minute, nil)
	registry := prometheus.NewRegistry()
	registry.MustRegister(collector)

	if _, err := registry.Gather(); err == nil {
		t.Errorf("gather with a label value that is not valid UTF-8: got nil error, want an error")
	}
}

func TestQueueCollectorRealInspector(t *testing.T) {
	redisServer := miniredis.RunT(t)
	redisOpt := asynq.RedisClientOpt{Addr: redisServer.Addr()}

	client := asynq.NewClient(redisOpt)
	t.Cleanup(func() { client.Close() })
	enqueued := map[string]int{"critical": 3, "default": 2}
	for queue, count := range enqueued {
		for range count {
			if _, err := client.Enqueue(asynq.NewTask("email:send", nil), asynq.Queue(queue)); err != nil {
				t.Fatalf("enqueue into %q: %v", queue, err)
			}
		}
	}

	inspector := asynq.NewInspector(redisOpt)
	t.Cleanup(func() { inspector.Close() })
	if err := inspector.PauseQueue("default"); err != nil {
		t.Fatalf("pause queue %q: %v", "default", err)
	}
	collector := newQueueCollector(inspector, configuredQueueLabel("critical", "default"), time.Minute, nil)

	want := queueTasksHeader + pendingTaskLines("critical", "3") + pendingTaskLines("default", "2") + queuePausedHeader + `
asynqlimit_queue_paused{queue="critical"} 0
asynqlimit_queue_paused{queue="default"} 1
` + queueInspectErrorsHeader + `
asynqlimit_queue_inspect_errors_total 0
`
	metricNames := []string{"asynqlimit_queue_tasks", "asynqlimit_queue_paused", "asynqlimit_queue_inspect_errors_total"}
	if err := testutil.CollectAndCompare(collector, strings.NewReader(want), metricNames...); err != nil {
		t.Errorf("unexpected metrics: %v", err)
	}
	// The latency depends on the wall clock, so only the series are counted.
	if got, want := testutil.CollectAndCount(collector, "asynqlimit_queue_latency_seconds"), 2; got != want {
		t.Errorf("latency series: got %d, want %d", got, want)
	}
}

func TestQueueCollectorClosed(t *testing.T) {
	insp := &fakeQueueInspector{infos: map[string]*asynq.QueueInfo{"critical": {Queue: "critical", Pending: 1}}}
	collector, clock, logs := newTestQueueCollector(insp, time.Second, "critical")
	if got := testutil.CollectAndCount(collector, "asynqlimit_queue_tasks"); got == 0 {
		t.Fatalf("queue_tasks series before close = 0, want some")
	}

	collector.close()
	clock.Advance(time.Hour)
	if got := testutil.CollectAndCount(collector, "asynqlimit_queue_tasks"); got != 0 {
		t.Errorf("queue_tasks series after close = %d, want 0", got)
	}
	if got := insp.roundCount(); got != 1 {
		t.Errorf("inspector rounds = %d, want 1: a closed collector must not read", got)
	}
	if got := testutil.ToFloat64(collector.inspectErrors); got != 0 {
		t.Errorf("inspect errors after close = %v, want 0", got)
	}
	if logs.Len() != 0 {
		t.Errorf("closed collector logged:\n%s", logs)
	}
}
