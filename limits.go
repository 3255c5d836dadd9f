package asynqlimit

import (
	"context"
	"fmt"
	"log/slog"
	"maps"
	"slices"
	"sort"
	"strings"
	"sync"
	"sync/atomic"
	"time"
	"unicode/utf8"

	"github.com/hibiken/asynq"

	"github.com/asynqlimit/asynqlimit/internal/resource"
)

// Mode chooses whether a Limiter enforces its decisions.
type Mode int

const (
	// Enforce defers, rejects and times out tasks as the budgets require. It is
	// the zero value.
	Enforce Mode = iota
	// Observe makes, counts and logs every decision but runs every task, so
	// limits can be tuned on production traffic before they are enforced. A
	// queue's Timeout does not end the handler's context; a handler that runs
	// past it is counted in asynqlimit_timeouts_total. The task's own asynq
	// deadline still applies.
	Observe
)

// String returns "enforce" or "observe".
func (m Mode) String() string {
	switch m {
	case Enforce:
		return "enforce"
	case Observe:
		return "observe"
	}
	return fmt.Sprintf("Mode(%d)", int(m))
}

// Limits holds the budget of every queue a worker serves.
type Limits struct {
	// Queues maps a queue name to its budget.
	Queues map[string]Budget
	// Default is the budget of every queue not named in Queues. Each such
	// queue gets its own copy of it: the Default concurrency caps each
	// queue, not all of them together. Their metrics share the label "other".
	Default Budget
	// Mode is Enforce (the zero value) or Observe.
	Mode Mode
	// Process holds thresholds on the memory and CPU of the whole process.
	// The zero value turns process pressure off.
	Process ProcessLimits
}

// Validate checks every field and returns a *ConfigError that lists each
// invalid one, or nil.
func (l Limits) Validate() error {
	var fields []FieldError
	names := make([]string, 0, len(l.Queues))
	for name := range l.Queues {
		names = append(names, name)
	}
	sort.Strings(names)

	for _, name := range names {
		path := fmt.Sprintf("Queues[%q]", name)
		switch {
		case strings.TrimSpace(name) == "":
			fields = append(fields, FieldError{path, "queue name must not be empty or only spaces, which asynq rejects; remove the entry or name the queue"})
		case !utf8.ValidString(name):
			fields = append(fields, FieldError{path, "queue name must be valid UTF-8, because it becomes a metrics label; rename the queue"})
		}
		if name == otherLabel {
			fields = append(fields, FieldError{path, `"other" is the metrics label of unnamed queues; configure that queue through Default or rename it`})
		}
		fields = append(fields, l.Queues[name].validate(path)...)
	}
	fields = append(fields, l.Default.validate("Default")...)
	fields = append(fields, l.Process.validate("Process")...)
	if l.Mode != Enforce && l.Mode != Observe {
		fields = append(fields, FieldError{"Mode", fmt.Sprintf("must be Enforce or Observe, got %d", int(l.Mode))})
	}

	if len(fields) == 0 {
		return nil
	}
	return &ConfigError{Fields: fields}
}

// Limiter applies Limits to the tasks of one asynq server. Create it with
// New; its methods are safe for concurrent use.
type Limiter struct {
	limits  Limits
	logger  *slog.Logger
	metrics *metrics

	// named holds the configured queues. It is written only by New, so the
	// middleware reads it without a lock.
	named map[string]*queueState
	// unnamed holds the queues that run under the Default budget, created
	// when their first task arrives.
	unnamed sync.Map

	// runs pools taskRun values of handlers that returned in time.
	runs sync.Pool
	// running counts the handlers that have not returned, abandoned ones
	// included.
	running atomic.Int64
	// monitor samples the process; nil when Limits.Process is off.
	monitor   *monitor
	estimator MemoryEstimator
	// tracksRuns is true when hard memory pressure may preempt running
	// tasks, which then register in their queue.
	tracksRuns bool
	// highestPriority is the highest Budget.Priority; its tasks are never
	// preempted.
	highestPriority int
	// cpuAccounting is false when thread CPU time cannot or may not be
	// measured; CPU budgets then do nothing.
	cpuAccounting bool
	cpuWindow     time.Duration
	// gate keeps asynq from dequeuing tasks of queues without room.
	gate *gate

	inspector      *asynq.Inspector
	ownsInspector  bool
	abandonGrace   time.Duration
	logEvery       time.Duration
	logBurst       int
	warnNested     sync.Once
	closeOnce      sync.Once
	closeInspector error
}

// New validates limits and returns a Limiter. The error is a *ConfigError
// when limits has invalid fields, or the error of registering the metrics.
func New(limits Limits, opts ...Option) (*Limiter, error) {
	if err := limits.Validate(); err != nil {
		return nil, err
	}
	o := defaultOptions()
	for _, opt := range opts {
		opt.apply(&o)
	}
	if err := checkMemoryEstimates(limits, o.estimator); err != nil {
		return nil, err
	}
	if limits.Process.enabled() {
		if err := checkProcessLimits(limits, &o); err != nil {
			return nil, err
		}
	}
	// A copy, so that a caller that changes its map later cannot race with
	// the metrics or change which queues are labelled by name.
	limits.Queues = maps.Clone(limits.Queues)

	l := &Limiter{
		limits:        limits,
		logger:        o.logger,
		named:         make(map[string]*queueState, len(limits.Queues)),
		inspector:     o.inspector,
		ownsInspector: o.ownsInspector,
		abandonGrace:  o.abandonGrace,
		logEvery:      o.logEvery,
		logBurst:      o.logBurst,
		estimator:     o.estimator,
	}
	m, err := newMetrics(o.registerer, limits, o.inspector, o.inspectTTL, o.logger)
	if err != nil {
		return nil, err
	}
	l.metrics = m
	l.gate = newGate(l, o.noGate)
	l.highestPriority = limits.Default.Priority
	for _, b := range limits.Queues {
		l.highestPriority = max(l.highestPriority, b.Priority)
	}
	l.tracksRuns = limits.Process.MemoryHard > 0 || limits.Process.MemoryHardFraction > 0
	l.cpuWindow = o.cpuWindow
	l.cpuAccounting = cpuAccountingNote(o.noCPUAccounting) == ""
	if note := cpuAccountingNote(o.noCPUAccounting); note != "" && limits.hasCPUBudget() {
		l.logger.Warn("asynqlimit: CPU budgets and TaskCPU limits are not enforced: " + note)
	}
	for name, b := range limits.Queues {
		l.named[name] = l.newQueueState(name, name, b)
	}
	if limits.Process.enabled() || (l.cpuAccounting && limits.hasCPUBudget()) {
		if l.monitor, err = l.startMonitor(o); err != nil {
			return nil, err
		}
	}
	l.logger.Info("asynqlimit: limiter started", "mode", limits.Mode.String(), "queues", len(limits.Queues))
	return l, nil
}

// Close stops the goroutine that samples the process and the queues' CPU
// use, restores the Go memory limit that SetGoMemoryLimit replaced, and
// stops the queue size metrics, so that scrapes report no queues. It closes
// the Inspector that NewServer created for them. Running handlers keep their
// budgets until they return, and a handler in asynq's goroutine that
// outlives its context still counts as abandoned after the grace period.
// Close is idempotent.
func (l *Limiter) Close() error {
	l.closeOnce.Do(func() {
		if l.monitor != nil {
			l.monitor.close()
			l.noticeAbandonedAtClose()
		}
		if l.metrics.queues != nil {
			l.metrics.queues.close()
		}
		if l.ownsInspector && l.inspector != nil {
			l.closeInspector = l.inspector.Close()
		}
	})
	return l.closeInspector
}

// checkMemoryEstimates returns a *ConfigError for each memory budget that
// has nothing to reserve: no TaskMemory and no estimator.
func checkMemoryEstimates(limits Limits, estimator MemoryEstimator) error {
	if estimator != nil {
		return nil
	}
	var fields []FieldError
	check := func(path string, b Budget) {
		if b.Memory > 0 && b.TaskMemory == 0 {
			fields = append(fields, FieldError{path + ".TaskMemory",
				"must be > 0 when Memory is set, or pass WithMemoryEstimator; a task would otherwise reserve nothing"})
		}
	}
	for _, name := range slices.Sorted(maps.Keys(limits.Queues)) {
		check(fmt.Sprintf("Queues[%q]", name), limits.Queues[name])
	}
	check("Default", limits.Default)
	if len(fields) == 0 {
		return nil
	}
	return &ConfigError{Fields: fields}
}

// hasCPUBudget reports whether any budget sets CPU or TaskCPU.
func (l Limits) hasCPUBudget() bool {
	if l.Default.CPU > 0 || l.Default.TaskCPU > 0 {
		return true
	}
	for _, b := range l.Queues {
		if b.CPU > 0 || b.TaskCPU > 0 {
			return true
		}
	}
	return false
}

// startMonitor starts the sampling goroutine: process pressure when
// Limits.Process sets a threshold, and the queues' CPU use.
func (l *Limiter) startMonitor(o options) (*monitor, error) {
	var m *monitor
	if l.limits.Process.enabled() {
		var err error
		if m, err = startProcessMonitor(l.limits, o, l.metrics.process); err != nil {
			return nil, err
		}
		m.preempt = l.preemptOne
	} else {
		m = newCPUOnlyMonitor(o.sampleInterval, o.logger)
	}
	m.sampleCPU = l.sampleCPU
	go m.run()
	return m, nil
}

// checkProcessLimits detects the process's limits into o, unless a test set
// them, and checks the thresholds that fractions of them resolve to. It logs
// a warning for each setting that cannot take effect.
func checkProcessLimits(limits Limits, o *options) error {
	if o.detected == nil {
		d, err := resource.DetectLimits()
		if err != nil {
			return fmt.Errorf("asynqlimit: detect the process's memory and CPU limits for Limits.Process: %w", err)
		}
		o.detected = &d
	}
	fields, warnings := limits.Process.checkResolved(*o.detected)
	if len(fields) > 0 {
		return &ConfigError{Fields: fields}
	}
	if !limits.hasPriorityBelowHighest() {
		warnings = append(warnings, "every queue has the same Priority, so process pressure never sheds or preempts a task; give less important queues a lower Budget.Priority")
	}
	for _, w := range warnings {
		o.logger.Warn("asynqlimit: " + w)
	}
	return nil
}

// hasPriorityBelowHighest reports whether some budget has a Priority below
// another's, which shedding and preemption need.
func (l Limits) hasPriorityBelowHighest() bool {
	for _, b := range l.Queues {
		if b.Priority != l.Default.Priority {
			return true
		}
	}
	return false
}

// startProcessMonitor builds the monitor of process pressure, on the limits
// that checkProcessLimits detected.
func startProcessMonitor(limits Limits, o options, pm *processMetrics) (*monitor, error) {
	detected := o.detected
	sampler := o.sampler
	if sampler == nil {
		s, err := resource.NewProcessSampler()
		if err != nil {
			return nil, fmt.Errorf("asynqlimit: start the process sampler for Limits.Process: %w", err)
		}
		sampler = s
	}

	priorities := []int{limits.Default.Priority}
	for _, b := range limits.Queues {
		priorities = append(priorities, b.Priority)
	}
	m := newMonitor(limits.Process, sampler, *detected, o.sampleInterval, priorities, o.logger, pm)
	// A first reading gives the memory that tasks admitted before the first
	// tick add to, and that their reservations come off as it grows.
	if s, err := sampler.Sample(); err == nil {
		m.lastRSS.Store(s.RSS)
	} else {
		m.sampleFailed(err, time.Now())
	}
	if limits.Process.SetGoMemoryLimit {
		m.setGoMemoryLimit()
	}
	return m, nil
}

// Drain waits until every handler that the middleware started has returned,
// abandoned ones included, or ctx ends. It returns ctx.Err() in that case.
// Call it after shutting the server down, before the process exits, so that
// handlers that ignore their context are not killed mid-work.
func (l *Limiter) Drain(ctx context.Context) error {
	ticker := time.NewTicker(10 * time.Millisecond)
	defer ticker.Stop()
	for l.running.Load() > 0 {
		select {
		case <-ctx.Done():
			return ctx.Err()
		case <-ticker.C:
		}
	}
	return nil
}

// queue returns the state of the named queue, creating it from the Default
// budget when the name is not configured.
func (l *Limiter) queue(name string) *queueState {
	if q, ok := l.named[name]; ok {
		return q
	}
	if q, ok := l.unnamed.Load(name); ok {
		return q.(*queueState)
	}
	q, _ := l.unnamed.LoadOrStore(name, l.newQueueState(name, otherLabel, l.limits.Default))
	return q.(*queueState)
}
