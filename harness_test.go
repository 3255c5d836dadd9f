package asynqlimit

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"log/slog"
	"sync"
	"testing"
	"time"

	"github.com/hibiken/asynq"
	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/testutil"
)

// harness is a NewServer on a database of its own on the test redis-server,
// with a client and an inspector on the same database.
type harness struct {
	t      *testing.T
	redis  asynq.RedisClientOpt
	client *asynq.Client
	insp   *asynq.Inspector
	reg    *prometheus.Registry
	srv    *Server
	logs   *syncBuffer
}

// newHarness builds a server for limits. Fields of cfg that are zero get
// values that keep the tests fast: deferred tasks return within 200ms and
// idle workers poll every 50ms.
func newHarness(t *testing.T, limits Limits, cfg asynq.Config, opts ...Option) *harness {
	t.Helper()
	db := testRedis.NewDB()
	h := &harness{
		t:     t,
		redis: asynq.RedisClientOpt{Addr: testRedis.Addr, DB: db},
		reg:   prometheus.NewRegistry(),
		logs:  &syncBuffer{},
	}
	if cfg.DelayedTaskCheckInterval == 0 {
		cfg.DelayedTaskCheckInterval = 200 * time.Millisecond
	}
	if cfg.TaskCheckInterval == 0 {
		cfg.TaskCheckInterval = 50 * time.Millisecond
	}
	if cfg.LogLevel == 0 {
		cfg.LogLevel = asynq.ErrorLevel
	}
	if cfg.ShutdownTimeout == 0 {
		cfg.ShutdownTimeout = 3 * time.Second
	}
	logger := slog.New(slog.NewTextHandler(h.logs, &slog.HandlerOptions{Level: slog.LevelDebug}))
	opts = append([]Option{WithRegisterer(h.reg), WithLogger(logger), WithInspectInterval(50 * time.Millisecond)}, opts...)

	srv, err := NewServer(h.redis, cfg, limits, opts...)
	if err != nil {
		t.Fatalf("NewServer: %v", err)
	}
	h.srv = srv
	h.client = asynq.NewClient(h.redis)
	h.insp = asynq.NewInspector(h.redis)
	t.Cleanup(func() {
		h.client.Close()
		h.insp.Close()
		if err := testRedis.FlushDB(db); err != nil {
			t.Errorf("FlushDB(%d): %v", db, err)
		}
	})
	return h
}

// start runs the server with handler and shuts it down when the test ends.
func (h *harness) start(handler asynq.Handler) {
	h.t.Helper()
	if err := h.srv.Start(handler); err != nil {
		h.t.Fatalf("Start: %v", err)
	}
	h.t.Cleanup(h.srv.Shutdown)
}

// enqueue enqueues a task that is kept for an hour after it completes, so
// the inspector can read it.
func (h *harness) enqueue(queue, typ string, payload []byte, opts ...asynq.Option) *asynq.TaskInfo {
	h.t.Helper()
	opts = append([]asynq.Option{asynq.Queue(queue), asynq.Retention(time.Hour)}, opts...)
	info, err := h.client.Enqueue(asynq.NewTask(typ, payload), opts...)
	if err != nil {
		h.t.Fatalf("Enqueue(%s on %s): %v", typ, queue, err)
	}
	return info
}

// queueInfo returns asynq's counts for queue.
func (h *harness) queueInfo(queue string) *asynq.QueueInfo {
	h.t.Helper()
	info, err := h.insp.GetQueueInfo(queue)
	if err != nil {
		h.t.Fatalf("GetQueueInfo(%s): %v", queue, err)
	}
	return info
}

// waitSettled waits until every task of queue is completed or archived and
// returns the queue's counts; it fails the test after timeout.
func (h *harness) waitSettled(queue string, timeout time.Duration) *asynq.QueueInfo {
	h.t.Helper()
	var info *asynq.QueueInfo
	waitFor(h.t, timeout, func() bool {
		info = h.queueInfo(queue)
		return info.Size == info.Completed+info.Archived && info.Active == 0
	}, func() string {
		return queueCounts(info)
	})
	return info
}

// taskInfo returns asynq's view of one task.
func (h *harness) taskInfo(queue, id string) *asynq.TaskInfo {
	h.t.Helper()
	info, err := h.insp.GetTaskInfo(queue, id)
	if err != nil {
		h.t.Fatalf("GetTaskInfo(%s, %s): %v", queue, id, err)
	}
	return info
}

// count returns the value of one series of the Limiter's metrics.
func (h *harness) count(vec interface {
	WithLabelValues(...string) prometheus.Counter
}, labels ...string) float64 {
	return testutil.ToFloat64(vec.WithLabelValues(labels...))
}

func (h *harness) outcome(queue string, o Outcome) float64 {
	return h.count(h.srv.limiter.metrics.tasks, queue, o.String())
}

func (h *harness) deferrals(queue string, r Reason) float64 {
	return h.count(h.srv.limiter.metrics.deferrals, queue, string(r))
}

func queueCounts(info *asynq.QueueInfo) string {
	if info == nil {
		return "no queue info"
	}
	return fmt.Sprintf("size %d, pending %d, active %d, retry %d, scheduled %d, completed %d, archived %d",
		info.Size, info.Pending, info.Active, info.Retry, info.Scheduled, info.Completed, info.Archived)
}

// waitFor polls cond every 20ms until it holds, and fails the test with
// describe() after timeout.
func waitFor(t *testing.T, timeout time.Duration, cond func() bool, describe func() string) {
	t.Helper()
	deadline := time.Now().Add(timeout)
	for !cond() {
		if time.Now().After(deadline) {
			t.Fatalf("condition not met after %s: %s", timeout, describe())
		}
		time.Sleep(20 * time.Millisecond)
	}
}

// peakTracker records the highest number of handlers per queue running at
// once.
type peakTracker struct {
	mu      sync.Mutex
	current map[string]int
	peak    map[string]int
	runs    map[string]int
}

func newPeakTracker() *peakTracker {
	return &peakTracker{current: map[string]int{}, peak: map[string]int{}, runs: map[string]int{}}
}

// handler returns a handler that sleeps for d while it is counted.
func (p *peakTracker) handler(d time.Duration) asynq.Handler {
	return asynq.HandlerFunc(func(ctx context.Context, _ *asynq.Task) error {
		q, _ := asynq.GetQueueName(ctx)
		p.mu.Lock()
		p.current[q]++
		p.runs[q]++
		p.peak[q] = max(p.peak[q], p.current[q])
		p.mu.Unlock()

		time.Sleep(d)

		p.mu.Lock()
		p.current[q]--
		p.mu.Unlock()
		return nil
	})
}

func (p *peakTracker) get(queue string) (peak, runs int) {
	p.mu.Lock()
	defer p.mu.Unlock()
	return p.peak[queue], p.runs[queue]
}

// syncBuffer is a bytes.Buffer that handlers of several goroutines can log
// to.
type syncBuffer struct {
	mu  sync.Mutex
	buf bytes.Buffer
}

func (b *syncBuffer) Write(p []byte) (int, error) {
	b.mu.Lock()
	defer b.mu.Unlock()
	return b.buf.Write(p)
}

func (b *syncBuffer) String() string {
	b.mu.Lock()
	defer b.mu.Unlock()
	return b.buf.String()
}

var errTest = errors.New("handler failure for the test")
