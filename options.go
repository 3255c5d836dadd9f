package asynqlimit

import (
	"log/slog"
	"time"

	"github.com/hibiken/asynq"
	"github.com/prometheus/client_golang/prometheus"

	"github.com/asynqlimit/asynqlimit/internal/resource"
)

// Option configures a Limiter. The zero set of options registers no
// metrics, discards logs and reads no queue sizes.
type Option interface {
	apply(*options)
}

type optionFunc func(*options)

func (f optionFunc) apply(o *options) { f(o) }

type options struct {
	registerer    prometheus.Registerer
	logger        *slog.Logger
	inspector     *asynq.Inspector
	ownsInspector bool
	inspectTTL    time.Duration
	abandonGrace  time.Duration
	logEvery      time.Duration
	logBurst      int

	sampler        Sampler
	sampleInterval time.Duration
	// detected replaces the detected process limits, for tests.
	detected  *resource.Limits
	estimator MemoryEstimator

	noCPUAccounting bool
	cpuWindow       time.Duration
	noGate          bool
}

// Defaults of the options.
const (
	DefaultInspectInterval = 5 * time.Second
	DefaultAbandonGrace    = 100 * time.Millisecond
	DefaultLogInterval     = time.Second
	DefaultLogBurst        = 10
)

func defaultOptions() options {
	return options{
		logger:       slog.New(slog.DiscardHandler),
		inspectTTL:   DefaultInspectInterval,
		abandonGrace: DefaultAbandonGrace,
		logEvery:     DefaultLogInterval,
		logBurst:     DefaultLogBurst,

		sampleInterval: DefaultSampleInterval,
		cpuWindow:      DefaultCPUWindow,
	}
}

// WithRegisterer registers the Limiter's metrics on r. Without it, or with a
// nil r, no metric is registered anywhere; the global registry is never used
// unless it is passed here.
func WithRegisterer(r prometheus.Registerer) Option {
	return optionFunc(func(o *options) { o.registerer = r })
}

// WithLogger sends the Limiter's logs to logger. Without it, or with a nil
// logger, logs are discarded.
func WithLogger(logger *slog.Logger) Option {
	return optionFunc(func(o *options) {
		if logger != nil {
			o.logger = logger
		}
	})
}

// WithInspector reports asynq's own queue sizes and latency, read through
// insp, as the metrics asynqlimit_queue_tasks, asynqlimit_queue_latency_seconds
// and asynqlimit_queue_paused. It needs WithRegisterer. The caller keeps
// ownership of insp; NewServer creates and closes its own.
func WithInspector(insp *asynq.Inspector) Option {
	return optionFunc(func(o *options) { o.inspector = insp })
}

// WithInspectInterval sets how long a reading of the queue sizes is reused,
// so that a scrape costs at most one round of inspector calls per d. If zero
// or less, DefaultInspectInterval.
func WithInspectInterval(d time.Duration) Option {
	return optionFunc(func(o *options) {
		if d > 0 {
			o.inspectTTL = d
		}
	})
}

// WithAbandonGrace sets how long a handler may take to return after its
// context ended before it counts as abandoned: a handler that checks its
// context needs a moment to notice. If negative, DefaultAbandonGrace.
func WithAbandonGrace(d time.Duration) Option {
	return optionFunc(func(o *options) {
		if d >= 0 {
			o.abandonGrace = d
		}
	})
}

// WithLogRate allows burst log lines per queue at once and then one per
// every. The lines held back are counted in the next one written. If every
// or burst is zero or less, the default is used.
func WithLogRate(every time.Duration, burst int) Option {
	return optionFunc(func(o *options) {
		if every > 0 {
			o.logEvery = every
		}
		if burst > 0 {
			o.logBurst = burst
		}
	})
}

// WithSampler reads the process's resource use with s instead of the
// default gopsutil sampler. It applies only when Limits.Process sets a
// threshold.
func WithSampler(s Sampler) Option {
	return optionFunc(func(o *options) { o.sampler = s })
}

// WithSampleInterval sets how often the sampling goroutine runs. At each
// interval it samples the process, when Limits.Process sets a threshold, and
// measures the CPU time of the queues with Budget.CPU or Budget.TaskCPU,
// when CPU accounting is on. A task over its TaskCPU is therefore stopped up
// to one interval late. If zero or less, DefaultSampleInterval.
func WithSampleInterval(d time.Duration) Option {
	return optionFunc(func(o *options) {
		if d > 0 {
			o.sampleInterval = d
		}
	})
}

// withDetectedLimits replaces the detected process limits, for tests.
func withDetectedLimits(d resource.Limits) Option {
	return optionFunc(func(o *options) { o.detected = &d })
}

// WithMemoryEstimator sets the function that returns each task's memory
// reservation, in place of Budget.TaskMemory. A negative value reserves 0,
// and a value above the queue's Memory is capped at Memory. The reservation
// counts against the queue's Memory budget and, with Limits.Process set, in
// the memory that admission projects for pressure (see Budget.TaskMemory).
func WithMemoryEstimator(f MemoryEstimator) Option {
	return optionFunc(func(o *options) { o.estimator = f })
}

// WithoutCPUAccounting turns off the measurement of each task's CPU time,
// which locks the handler's goroutine to an OS thread while it runs. Budget.CPU
// and Budget.TaskCPU then have no effect.
func WithoutCPUAccounting() Option {
	return optionFunc(func(o *options) { o.noCPUAccounting = true })
}

// WithCPUWindow sets the window over which a queue's CPU use is averaged for
// Budget.CPU. If zero or less, DefaultCPUWindow.
func WithCPUWindow(d time.Duration) Option {
	return optionFunc(func(o *options) {
		if d > 0 {
			o.cpuWindow = d
		}
	})
}

// WithoutGate turns the dequeue gate off: NewServer adds no hook to its
// Redis client and InstrumentRedis does nothing. asynq then dequeues the
// tasks of a queue without room, and the middleware defers them.
func WithoutGate() Option {
	return optionFunc(func(o *options) { o.noGate = true })
}
