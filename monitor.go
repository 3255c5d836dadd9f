package asynqlimit

import (
	"fmt"
	"log/slog"
	"math"
	"os"
	"runtime/debug"
	runtimemetrics "runtime/metrics"
	"sync/atomic"
	"time"

	"github.com/asynqlimit/asynqlimit/internal/resource"
)

// Sampler reads the resource use of the worker process with its one method,
// Sample() (ResourceSample, error). The default reads resident memory and CPU
// time with gopsutil and the Go runtime's memory from runtime/metrics.
// WithSampler replaces it, in tests for example.
type Sampler = resource.Sampler

// ResourceSample is one reading of a Sampler. Its fields:
//
//   - At time.Time: when the sample was taken, with a monotonic clock
//     reading, so that CPU use between samples survives wall clock changes.
//   - RSS int64: the resident set size in bytes, including memory mapped by
//     cgo and other non-Go code. Pressure compares it with the memory
//     thresholds.
//   - CPUTime time.Duration: user plus system CPU time of all the process's
//     threads since it started; on Linux it advances in whole clock ticks.
//     Pressure compares its rate between two samples, in cores, with the CPU
//     thresholds.
//   - GoHeap int64: bytes of Go heap objects, live and not yet freed.
//   - GoTotal int64: bytes that the Go runtime has mapped read-write,
//     including memory released to the operating system.
type ResourceSample = resource.Sample

// noShed is the value of monitor.shedMax while no priority is shed.
const noShed = math.MinInt64

// monitor samples the process on a ticker and turns the samples into
// pressure levels and the highest priority that soft pressure sheds.
type monitor struct {
	sampler  Sampler
	interval time.Duration
	logger   *slog.Logger
	metrics  *processMetrics

	memory, cpu threshold
	ladder      *shedLadder
	prev        ResourceSample
	hasPrev     bool
	// lastErrorLog and failedSamples rate-limit the log of failed samples.
	// Only the sampling goroutine uses them.
	lastErrorLog  time.Time
	failedSamples int

	// shedMax is the highest shed priority, or noShed. Admission reads it
	// without a lock.
	shedMax atomic.Int64
	// memoryLevel is the memory Pressure at the last sample.
	memoryLevel atomic.Int32
	// lastRSS is the resident memory at the last sample, and pending is the
	// memory reserved by the running tasks that the samples do not show
	// yet. Admission adds them up, so that a burst of admissions is shed
	// before the samples measure it.
	lastRSS atomic.Int64
	pending unseen
	// lowest is the lowest priority below the highest, shed first when the
	// projected memory reaches the soft threshold; hasLowest is false with
	// a single priority.
	lowest    int
	hasLowest bool

	// preempt preempts one running task; called once per sample while
	// memory pressure is hard.
	preempt func() bool
	// sampleCPU updates the queues' CPU use; called every interval.
	sampleCPU func()

	// restoreMemoryLimit undoes SetGoMemoryLimit on close; nil when the
	// limit was not changed.
	restoreMemoryLimit func()

	stop chan struct{}
	done chan struct{}
}

func newMonitor(p ProcessLimits, sampler Sampler, detected resource.Limits, interval time.Duration,
	priorities []int, logger *slog.Logger, pm *processMetrics) *monitor {
	m := &monitor{
		sampler:  sampler,
		interval: interval,
		logger:   logger,
		metrics:  pm,
		ladder:   newShedLadder(priorities),
		stop:     make(chan struct{}),
		done:     make(chan struct{}),
	}
	m.memory, m.cpu = p.resolve(detected.MemoryBytes, detected.CPUCores, interval)
	m.shedMax.Store(noShed)
	if len(m.ladder.priorities) > 0 {
		m.lowest, m.hasLowest = m.ladder.priorities[0], true
	}
	pm.setLimits(m.memory, m.cpu)
	logger.Info("asynqlimit: process limits",
		"memory_limit_bytes", detected.MemoryBytes, "memory_limit_source", detected.MemorySource,
		"cpu_limit_cores", detected.CPUCores, "cpu_limit_source", detected.CPUSource,
		"memory_soft_bytes", int64(m.memory.soft), "memory_hard_bytes", int64(m.memory.hard),
		"cpu_soft_cores", m.cpu.soft, "cpu_hard_cores", m.cpu.hard)
	return m
}

// newCPUOnlyMonitor returns a monitor that only samples the queues' CPU
// use, for Limits without process thresholds.
func newCPUOnlyMonitor(interval time.Duration, logger *slog.Logger) *monitor {
	m := &monitor{interval: interval, logger: logger, ladder: newShedLadder(nil),
		stop: make(chan struct{}), done: make(chan struct{})}
	m.shedMax.Store(noShed)
	return m
}

// run samples every interval until close.
func (m *monitor) run() {
	defer close(m.done)
	ticker := time.NewTicker(m.interval)
	defer ticker.Stop()
	for {
		select {
		case <-m.stop:
			return
		case now := <-ticker.C:
			if m.sampler != nil {
				s, err := m.sampler.Sample()
				m.step(s, err, now)
			}
			if m.sampleCPU != nil {
				m.sampleCPU()
			}
		}
	}
}

func (m *monitor) close() {
	close(m.stop)
	<-m.done
	if m.restoreMemoryLimit != nil {
		m.restoreMemoryLimit()
	}
}

// setGoMemoryLimit sets the runtime's soft memory limit to the soft memory
// threshold unless a limit is set already.
func (m *monitor) setGoMemoryLimit() {
	soft := int64(m.memory.soft)
	if soft <= 0 {
		m.logger.Warn("asynqlimit: SetGoMemoryLimit has no effect without a soft memory threshold; set Process.MemorySoft or MemorySoftFraction")
		return
	}
	previous := debug.SetMemoryLimit(-1)
	if previous != math.MaxInt64 || os.Getenv("GOMEMLIMIT") != "" {
		m.logger.Info("asynqlimit: Go memory limit left as it is, because it was set already", "limit_bytes", previous, "soft_threshold_bytes", soft)
		return
	}
	debug.SetMemoryLimit(soft)
	m.restoreMemoryLimit = func() { debug.SetMemoryLimit(previous) }
	m.logger.Info("asynqlimit: Go memory limit set to the soft memory threshold", "limit_bytes", soft)
	if used := goMemoryUsed(); used > uint64(soft) {
		m.logger.Warn("asynqlimit: the Go runtime already uses more memory than the soft threshold, so the garbage collector will run almost without pause; raise the soft memory threshold or turn SetGoMemoryLimit off",
			"go_memory_bytes", used, "soft_threshold_bytes", soft)
	}
}

// goMemoryUsed returns the memory that the Go runtime has mapped and not
// released, the total that the Go memory limit applies to.
func goMemoryUsed() uint64 {
	samples := []runtimemetrics.Sample{
		{Name: "/memory/classes/total:bytes"},
		{Name: "/memory/classes/heap/released:bytes"},
	}
	runtimemetrics.Read(samples)
	for _, s := range samples {
		if s.Value.Kind() != runtimemetrics.KindUint64 {
			return 0
		}
	}
	return samples[0].Value.Uint64() - samples[1].Value.Uint64()
}

// step turns one sample into pressure levels and a shedding decision. A
// failed sample is logged and counted and leaves every decision as it was.
func (m *monitor) step(s ResourceSample, err error, now time.Time) {
	if err != nil {
		m.sampleFailed(err, now)
		return
	}

	cores := 0.0
	if m.hasPrev {
		cores = resource.CPUCores(m.prev, s)
	}
	m.prev, m.hasPrev = s, true
	m.metrics.rss.Set(float64(s.RSS))
	m.metrics.cpu.Set(cores)

	memoryLevel := m.transition("memory", &m.memory, float64(s.RSS), now)
	cpuLevel := m.transition("cpu", &m.cpu, cores, now)
	m.memoryLevel.Store(int32(memoryLevel))
	if previous := m.lastRSS.Swap(s.RSS); previous > 0 {
		m.pending.grew(s.RSS - previous)
	}

	m.updateShedding(max(memoryLevel, cpuLevel) >= PressureSoft)
	// The level stays hard through the grace period after memory falls
	// back, so preemption also needs this sample to be over the threshold:
	// otherwise it would go on stopping tasks that no longer need stopping.
	if memoryLevel == PressureHard && m.memory.rawLevel(float64(s.RSS), 0) == PressureHard && m.preempt != nil {
		m.preempt()
	}
}

// sampleErrorLogEvery is the least time between two log lines of failed
// samples. The sampler_errors_total counter counts every failure.
const sampleErrorLogEvery = time.Minute

// sampleFailed counts a failed sample and logs it, at most once per
// sampleErrorLogEvery, with the number of failures since the last line.
func (m *monitor) sampleFailed(err error, now time.Time) {
	m.metrics.samplerErrors.Inc()
	m.failedSamples++
	if !m.lastErrorLog.IsZero() && now.Sub(m.lastErrorLog) < sampleErrorLogEvery {
		return
	}
	m.logger.Error("asynqlimit: sampling the process failed; pressure decisions stay as they were until a sample succeeds",
		"error", err, "failures_since_last_log", m.failedSamples)
	m.lastErrorLog, m.failedSamples = now, 0
}

// transition updates one resource's threshold, and logs and reports a
// change of its level.
func (m *monitor) transition(resourceName string, th *threshold, value float64, now time.Time) Pressure {
	before := th.level
	level := th.update(value, now)
	m.metrics.pressure.WithLabelValues(resourceName).Set(float64(level))
	if level != before {
		args := []any{"resource", resourceName, "from", before.String(), "to", level.String()}
		if resourceName == "memory" { // bytes, as integers rather than 3.98e+08
			args = append(args, "value_bytes", int64(value), "soft_bytes", int64(th.soft), "hard_bytes", int64(th.hard))
		} else {
			args = append(args, "value_cores", value, "soft_cores", th.soft, "hard_cores", th.hard)
		}
		m.logger.Warn("asynqlimit: process pressure changed", args...)
	}
	return level
}

// updateShedding moves the shedding ladder one step and logs a change.
func (m *monitor) updateShedding(pressure bool) {
	before := m.shedMax.Load()
	maxShed, shedding := m.ladder.step(pressure)
	after := int64(noShed)
	if shedding {
		after = int64(maxShed)
	}
	m.shedMax.Store(after)
	if after != before {
		m.logger.Warn("asynqlimit: shedding changed", "shed_priorities_up_to", shedLabel(after))
	}
}

// sheds reports whether pressure sheds a new task of priority that would
// reserve reservation bytes. It does when the ladder sheds the priority. It
// also does when the reservations that the samples do not show yet, plus
// this one, would take the last sample's memory over a threshold it was
// below.
// Crossing soft sheds the lowest priority, and crossing hard sheds every
// priority but the highest. A sample already over a threshold is left to
// the grace period.
func (m *monitor) sheds(priority int, reservation int64) bool {
	if int64(priority) <= m.shedMax.Load() {
		return true
	}
	if !m.hasLowest || m.memory.soft == 0 && m.memory.hard == 0 {
		return false
	}
	sampled := m.lastRSS.Load()
	level := m.memory.rawLevel(float64(sampled)+float64(m.pending.total())+float64(reservation), 0)
	if level <= m.memory.rawLevel(float64(sampled), 0) {
		return false
	}
	switch level {
	case PressureHard:
		return priority < m.ladder.highest
	case PressureSoft:
		return priority <= m.lowest
	}
	return false
}

func shedLabel(maxShed int64) string {
	if maxShed == noShed {
		return "none"
	}
	return fmt.Sprint(maxShed)
}
