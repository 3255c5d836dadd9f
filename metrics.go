package asynqlimit

import (
	"fmt"
	"log/slog"
	"time"

	"github.com/hibiken/asynq"
	"github.com/prometheus/client_golang/prometheus"
)

const namespace = "asynqlimit"

// otherLabel is the queue label of every queue not named in Limits.Queues,
// so that queue names chosen by producers cannot create series. Validate
// rejects a configured queue of this name. The unnamed queues share each
// series: counters and histograms add up, as do the in-flight, abandoned,
// memory-reserved, CPU-use and gate-closed gauges.
const otherLabel = "other"

// Outcome is the end state of a task handled by the middleware. It is the value of
// the outcome label of asynqlimit_tasks_total.
type Outcome int

// The outcomes, in the order of their label values.
const (
	OutcomeSucceeded Outcome = iota
	OutcomeFailed
	OutcomeDeferred
	OutcomeRejected
	OutcomeTimedOut
	OutcomePreempted
	numOutcomes
)

var outcomeLabels = [numOutcomes]string{
	"succeeded", "failed", "deferred", "rejected", "timed_out", "preempted",
}

// String returns the label value of o.
func (o Outcome) String() string {
	if o < 0 || o >= numOutcomes {
		return fmt.Sprintf("Outcome(%d)", int(o))
	}
	return outcomeLabels[o]
}

// rejectPayload is the only reason label of asynqlimit_rejections_total in
// this version.
const rejectPayload = "payload"

// durationBuckets spans 5ms to about 20 minutes, the range of task run times
// from quick jobs to long batch work.
var durationBuckets = prometheus.ExponentialBuckets(0.005, 2.5, 12)

// metrics holds the vectors of one Limiter.
type metrics struct {
	inFlight    *prometheus.GaugeVec
	tasks       *prometheus.CounterVec
	deferrals   *prometheus.CounterVec
	rejections  *prometheus.CounterVec
	duration    *prometheus.HistogramVec
	abandoned   *prometheus.GaugeVec
	concurrency *prometheus.GaugeVec
	waits       *prometheus.CounterVec
	timeouts    *prometheus.CounterVec
	preemptions *prometheus.CounterVec
	taskCPU     *prometheus.HistogramVec
	cpuCores    *prometheus.GaugeVec
	cpuBudget   *prometheus.GaugeVec
	memReserved *prometheus.GaugeVec
	memBudget   *prometheus.GaugeVec
	gateClosed  *prometheus.GaugeVec
	gateSkips   *prometheus.CounterVec
	// gateDisabled is 1 once the dequeue gate has switched itself off.
	gateDisabled prometheus.Gauge
	// queues reports asynq's queue sizes; nil without an inspector or a
	// registerer.
	queues  *queueCollector
	process *processMetrics
}

// queueMetrics holds the series of one queue label, resolved once so the
// middleware does no label lookups.
type queueMetrics struct {
	inFlight    prometheus.Gauge
	abandoned   prometheus.Gauge
	duration    prometheus.Observer
	outcomes    [numOutcomes]prometheus.Counter
	deferrals   map[Reason]prometheus.Counter
	rejected    prometheus.Counter
	waits       prometheus.Counter
	timeouts    prometheus.Counter
	preemptions prometheus.Counter
	taskCPU     prometheus.Observer
	cpuCores    prometheus.Gauge

	memoryReserved prometheus.Gauge
	gateClosed     prometheus.Gauge
	gateSkips      prometheus.Counter
}

func newMetrics(reg prometheus.Registerer, limits Limits, insp *asynq.Inspector, inspectTTL time.Duration, logger *slog.Logger) (*metrics, error) {
	queue := []string{"queue"}
	m := &metrics{
		inFlight: prometheus.NewGaugeVec(prometheus.GaugeOpts{
			Namespace: namespace, Name: "tasks_in_flight",
			Help: "Handlers running now, abandoned ones included.",
		}, queue),
		tasks: prometheus.NewCounterVec(prometheus.CounterOpts{
			Namespace: namespace, Name: "tasks_total",
			Help: "Tasks handled by the middleware, by outcome.",
		}, []string{"queue", "outcome"}),
		deferrals: prometheus.NewCounterVec(prometheus.CounterOpts{
			Namespace: namespace, Name: "deferrals_total",
			Help: "Deferral decisions by reason; in observe mode the task ran anyway.",
		}, []string{"queue", "reason"}),
		rejections: prometheus.NewCounterVec(prometheus.CounterOpts{
			Namespace: namespace, Name: "rejections_total",
			Help: "Rejection decisions by reason; in observe mode the task ran anyway.",
		}, []string{"queue", "reason"}),
		duration: prometheus.NewHistogramVec(prometheus.HistogramOpts{
			Namespace: namespace, Name: "task_duration_seconds",
			Help:    "Handler wall time, measured until the handler really returned.",
			Buckets: durationBuckets,
		}, queue),
		abandoned: prometheus.NewGaugeVec(prometheus.GaugeOpts{
			Namespace: namespace, Name: "abandoned_tasks",
			Help: "Handlers still running after their context ended.",
		}, queue),
		concurrency: prometheus.NewGaugeVec(prometheus.GaugeOpts{
			Namespace: namespace, Name: "queue_concurrency_limit",
			Help: "Concurrency budget of the queue in this process; 0 means no cap.",
		}, queue),
		waits: prometheus.NewCounterVec(prometheus.CounterOpts{
			Namespace: namespace, Name: "waits_total",
			Help: "Tasks on their last attempt that waited for room instead of being deferred.",
		}, queue),
		memReserved: prometheus.NewGaugeVec(prometheus.GaugeOpts{
			Namespace: namespace, Name: "queue_memory_reserved_bytes",
			Help: "Memory reserved by the running tasks of the queue, from their estimates.",
		}, queue),
		memBudget: prometheus.NewGaugeVec(prometheus.GaugeOpts{
			Namespace: namespace, Name: "queue_memory_budget_bytes",
			Help: "Memory budget of the queue; 0 means none.",
		}, queue),
		taskCPU: prometheus.NewHistogramVec(prometheus.HistogramOpts{
			Namespace: namespace, Name: "task_cpu_seconds",
			Help:    "CPU time of each task, measured on its handler's thread, for queues that account CPU.",
			Buckets: durationBuckets,
		}, queue),
		cpuCores: prometheus.NewGaugeVec(prometheus.GaugeOpts{
			Namespace: namespace, Name: "queue_cpu_cores",
			Help: "CPU use of the queue's tasks averaged over the CPU window, in cores.",
		}, queue),
		cpuBudget: prometheus.NewGaugeVec(prometheus.GaugeOpts{
			Namespace: namespace, Name: "queue_cpu_budget_cores",
			Help: "CPU budget of the queue in cores; 0 means none.",
		}, queue),
		preemptions: prometheus.NewCounterVec(prometheus.CounterOpts{
			Namespace: namespace, Name: "preemptions_total",
			Help: "Running tasks chosen for preemption under hard memory pressure; in observe mode they ran on.",
		}, queue),
		timeouts: prometheus.NewCounterVec(prometheus.CounterOpts{
			Namespace: namespace, Name: "timeouts_total",
			Help: "Tasks that reached their queue's Timeout; in observe mode their context was left alone.",
		}, queue),
		gateClosed: prometheus.NewGaugeVec(prometheus.GaugeOpts{
			Namespace: namespace, Name: "gate_closed",
			Help: "1 while the dequeue gate keeps asynq from dequeuing the queue's tasks; for other, the number of such unnamed queues.",
		}, queue),
		gateSkips: prometheus.NewCounterVec(prometheus.CounterOpts{
			Namespace: namespace, Name: "gate_skips_total",
			Help: "Dequeue calls that the gate skipped, returning an empty queue to asynq; in observe mode, the calls it would have skipped.",
		}, queue),
		gateDisabled: prometheus.NewGauge(prometheus.GaugeOpts{
			Namespace: namespace, Name: "gate_disabled",
			Help: "1 when the dequeue gate switched itself off because it recognised no asynq dequeue call while tasks ran.",
		}),
	}

	m.process = newProcessMetrics()
	m.concurrency.WithLabelValues(otherLabel).Set(float64(limits.Default.Concurrency))
	m.memBudget.WithLabelValues(otherLabel).Set(float64(limits.Default.Memory))
	m.cpuBudget.WithLabelValues(otherLabel).Set(limits.Default.CPU)
	m.forQueue(otherLabel)
	for name, b := range limits.Queues {
		m.concurrency.WithLabelValues(name).Set(float64(b.Concurrency))
		m.memBudget.WithLabelValues(name).Set(float64(b.Memory))
		m.cpuBudget.WithLabelValues(name).Set(b.CPU)
		m.forQueue(name)
	}

	if reg == nil {
		return m, nil
	}
	collectors := []prometheus.Collector{
		m.inFlight, m.tasks, m.deferrals, m.rejections, m.duration, m.abandoned, m.concurrency, m.waits, m.timeouts, m.preemptions, m.taskCPU, m.cpuCores, m.cpuBudget, m.memReserved, m.memBudget,
		m.gateClosed, m.gateSkips, m.gateDisabled,
	}
	collectors = append(collectors, m.process.collectors()...)
	if insp != nil {
		m.queues = newQueueCollector(insp, limits.label, inspectTTL, logger)
		collectors = append(collectors, m.queues)
	}
	for _, c := range collectors {
		if err := reg.Register(c); err != nil {
			return nil, fmt.Errorf("asynqlimit: register metrics: %w (is another Limiter registered on the same registry?)", err)
		}
	}
	return m, nil
}

// forQueue resolves, and so creates at zero, every series of one queue label.
func (m *metrics) forQueue(label string) queueMetrics {
	qm := queueMetrics{
		inFlight:    m.inFlight.WithLabelValues(label),
		abandoned:   m.abandoned.WithLabelValues(label),
		duration:    m.duration.WithLabelValues(label),
		deferrals:   make(map[Reason]prometheus.Counter, len(allReasons)),
		rejected:    m.rejections.WithLabelValues(label, rejectPayload),
		waits:       m.waits.WithLabelValues(label),
		timeouts:    m.timeouts.WithLabelValues(label),
		preemptions: m.preemptions.WithLabelValues(label),
		taskCPU:     m.taskCPU.WithLabelValues(label),
		cpuCores:    m.cpuCores.WithLabelValues(label),

		memoryReserved: m.memReserved.WithLabelValues(label),
		gateClosed:     m.gateClosed.WithLabelValues(label),
		gateSkips:      m.gateSkips.WithLabelValues(label),
	}
	for o := range numOutcomes {
		qm.outcomes[o] = m.tasks.WithLabelValues(label, outcomeLabels[o])
	}
	for _, r := range allReasons {
		qm.deferrals[r] = m.deferrals.WithLabelValues(label, string(r))
	}
	return qm
}

// label returns the metrics label of a queue: its name when it is configured,
// otherwise "other".
func (l Limits) label(queue string) string {
	if _, ok := l.Queues[queue]; ok {
		return queue
	}
	return otherLabel
}
