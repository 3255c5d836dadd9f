package asynqlimit

import (
	"fmt"
	"log/slog"
	"sync"
	"time"

	"github.com/hibiken/asynq"
	"github.com/prometheus/client_golang/prometheus"
)

// queueInspector is the part of *asynq.Inspector that queueCollector reads.
type queueInspector interface {
	Queues() ([]string, error)
	GetQueueInfo(queue string) (*asynq.QueueInfo, error)
}

var _ prometheus.Collector = (*queueCollector)(nil)

// queueCollector is a Prometheus collector of asynq's queue sizes, latency and
// paused state, read through an asynq inspector and cached for ttl.
type queueCollector struct {
	inspector queueInspector
	label     func(queue string) string
	ttl       time.Duration
	logger    *slog.Logger
	// now is the clock of the cache, replaced in tests.
	now func() time.Time

	tasksDesc     *prometheus.Desc
	latencyDesc   *prometheus.Desc
	pausedDesc    *prometheus.Desc
	inspectErrors prometheus.Counter

	// mu guards the fields below. Collect holds it across an inspector round,
	// so concurrent scrapes wait for that round instead of starting their own.
	mu sync.Mutex
	// attempted is true once a round has started.
	attempted bool
	// roundAt is the start time of the last round, successful or not.
	roundAt time.Time
	// last is the last successful reading by queue label, nil before the first.
	last map[string]*queueStats
	// lastAt is the start time of the round that produced last.
	lastAt time.Time
	// closed is true once the inspector is closed; scrapes then report no
	// queues rather than an error per scrape.
	closed bool
}

// newQueueCollector returns a collector that reports asynq's queue sizes
// and latency, reading them at most once per ttl.
//
// label maps a queue name to the value of the queue label. Queues that map to
// the same label are reported together: their task counts are summed, the
// latency is the maximum and paused is 1 if any of them is paused. A label
// that is not valid UTF-8 makes the scrape report an error for that series.
// A ttl of zero or less reads the queues on every scrape. A nil logger
// discards the log records.
func newQueueCollector(insp queueInspector, label func(queue string) string, ttl time.Duration, logger *slog.Logger) *queueCollector {
	if logger == nil {
		logger = slog.New(slog.DiscardHandler)
	}

	return &queueCollector{
		inspector: insp,
		label:     label,
		ttl:       ttl,
		logger:    logger,
		now:       time.Now,
		tasksDesc: prometheus.NewDesc(
			prometheus.BuildFQName("asynqlimit", "queue", "tasks"),
			"Number of tasks in asynq queues by state, read through the asynq inspector. Queues that share a queue label are summed.",
			[]string{"queue", "state"}, nil,
		),
		latencyDesc: prometheus.NewDesc(
			prometheus.BuildFQName("asynqlimit", "queue", "latency_seconds"),
			"Age in seconds of the oldest pending task in asynq queues. Queues that share a queue label report the maximum.",
			[]string{"queue"}, nil,
		),
		pausedDesc: prometheus.NewDesc(
			prometheus.BuildFQName("asynqlimit", "queue", "paused"),
			"Whether asynq queues are paused (1) or not (0). Queues that share a queue label report 1 if any of them is paused.",
			[]string{"queue"}, nil,
		),
		inspectErrors: prometheus.NewCounter(prometheus.CounterOpts{
			Namespace: "asynqlimit",
			Subsystem: "queue",
			Name:      "inspect_errors_total",
			Help:      "Number of failed reads of asynq queues through the asynq inspector.",
		}),
	}
}

// Describe sends the descriptors of all metrics that Collect sends.
func (c *queueCollector) Describe(ch chan<- *prometheus.Desc) {
	ch <- c.tasksDesc
	ch <- c.latencyDesc
	ch <- c.pausedDesc
	c.inspectErrors.Describe(ch)
}

// Collect sends the queue metrics of the cached reading, reading the queues
// first if the cache is at least ttl old.
func (c *queueCollector) Collect(ch chan<- prometheus.Metric) {
	for label, stats := range c.reading() {
		for _, tasks := range stats.tasksByState() {
			c.send(ch, c.tasksDesc, float64(tasks.count), label, tasks.state)
		}
		c.send(ch, c.latencyDesc, stats.latency.Seconds(), label)
		c.send(ch, c.pausedDesc, stats.pausedValue(), label)
	}
	c.inspectErrors.Collect(ch)
}

// send sends one gauge sample, or an invalid metric that makes the registry
// report the error, for example when a label value is not valid UTF-8.
func (c *queueCollector) send(ch chan<- prometheus.Metric, desc *prometheus.Desc, value float64, labelValues ...string) {
	metric, err := prometheus.NewConstMetric(desc, prometheus.GaugeValue, value, labelValues...)
	if err != nil {
		metric = prometheus.NewInvalidMetric(desc, err)
	}
	ch <- metric
}

// reading returns the cached reading, or starts a new inspector round if the
// last round is at least ttl old. After a failed round it returns the last
// successful reading, which is nil if no round has succeeded.
func (c *queueCollector) reading() map[string]*queueStats {
	c.mu.Lock()
	defer c.mu.Unlock()

	now := c.now()
	if c.closed {
		return nil
	}
	if c.attempted && now.Sub(c.roundAt) < c.ttl {
		return c.last
	}
	c.attempted = true
	// A failed round is cached too, so a broken Redis costs at most one inspector
	// round and one log record per ttl.
	c.roundAt = now

	stats, err := c.readQueues()
	if err != nil {
		c.inspectErrors.Inc()
		attrs := []any{"error", err, "has_previous_reading", c.last != nil}
		if c.last != nil {
			attrs = append(attrs, "previous_reading_age", now.Sub(c.lastAt))
		}
		c.logger.Error("failed to read asynq queues for metrics", attrs...)
		return c.last
	}

	c.last = stats
	c.lastAt = now
	return stats
}

// close stops the collector from using its inspector, which its owner is
// about to close.
func (c *queueCollector) close() {
	c.mu.Lock()
	defer c.mu.Unlock()
	c.closed = true
	c.last = nil
}

// readQueues reads every queue through the inspector and groups the results
// by queue label. Any failed read fails the whole round, so that a label
// shared by several queues never reports a partial sum.
func (c *queueCollector) readQueues() (map[string]*queueStats, error) {
	queues, err := c.inspector.Queues()
	if err != nil {
		return nil, fmt.Errorf("list asynq queues: %w", err)
	}

	byLabel := make(map[string]*queueStats, len(queues))
	for _, queue := range queues {
		// NOTE: a queue deleted between Queues and GetQueueInfo also fails the
		// round, because asynq v0.26.0 returns an internal error type for it.
		info, err := c.inspector.GetQueueInfo(queue)
		if err != nil {
			return nil, fmt.Errorf("get info of asynq queue %q: %w", queue, err)
		}

		label := c.label(queue)
		stats, ok := byLabel[label]
		if !ok {
			stats = &queueStats{}
			byLabel[label] = stats
		}
		stats.add(info)
	}
	return byLabel, nil
}

// queueStats is the combined reading of the queues that share one label.
type queueStats struct {
	pending     int
	active      int
	scheduled   int
	retry       int
	archived    int
	completed   int
	aggregating int
	latency     time.Duration
	paused      bool
}

// add merges the reading of one queue into s.
func (s *queueStats) add(info *asynq.QueueInfo) {
	s.pending += info.Pending
	s.active += info.Active
	s.scheduled += info.Scheduled
	s.retry += info.Retry
	s.archived += info.Archived
	s.completed += info.Completed
	s.aggregating += info.Aggregating
	s.latency = max(s.latency, info.Latency)
	s.paused = s.paused || info.Paused
}

// queueStateCount is the number of tasks in one state.
type queueStateCount struct {
	state string
	count int
}

// tasksByState returns the task counts with their state label values.
func (s *queueStats) tasksByState() []queueStateCount {
	return []queueStateCount{
		{state: "pending", count: s.pending},
		{state: "active", count: s.active},
		{state: "scheduled", count: s.scheduled},
		{state: "retry", count: s.retry},
		{state: "archived", count: s.archived},
		{state: "completed", count: s.completed},
		{state: "aggregating", count: s.aggregating},
	}
}

// pausedValue returns 1 if any of the queues is paused and 0 otherwise.
func (s *queueStats) pausedValue() float64 {
	if s.paused {
		return 1
	}
	return 0
}
