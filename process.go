package asynqlimit

import (
	"fmt"
	"math"
	"time"

	"github.com/asynqlimit/asynqlimit/internal/resource"
)

// Defaults of ProcessLimits.
const (
	DefaultHysteresis     = 0.05
	DefaultSampleInterval = 250 * time.Millisecond
)

// ProcessLimits are soft and hard thresholds on the memory and CPU of the
// whole worker process. Pressure sheds the lowest-priority queues: their new
// tasks are deferred with reason "pressure", one more priority level each
// sample interval while pressure lasts, never the highest priority. A task on
// its last attempt is not shed, because asynq would archive it.
//
// Hard memory pressure also preempts running tasks, one per sample while it
// lasts: of the queues below the highest priority, the lowest priority first
// and, within it, the largest memory reservation (Budget.TaskMemory or the
// estimator's value). A preempted task's context is canceled and the task
// is deferred without spending a retry. A task on its last attempt is never
// preempted.
//
// Each threshold is given either as an absolute value or as a fraction of
// the limit detected at start: the cgroup limit in a container, otherwise the
// host's memory or GOMAXPROCS. Setting both is an error. A threshold that is
// zero both ways is off. The zero ProcessLimits turns all of them off.
type ProcessLimits struct {
	// MemorySoft and MemoryHard are resident memory thresholds in bytes.
	MemorySoft, MemoryHard int64
	// MemorySoftFraction and MemoryHardFraction are the memory thresholds
	// as fractions of the detected memory limit, in (0, 1].
	MemorySoftFraction, MemoryHardFraction float64
	// CPUSoft and CPUHard are thresholds on the process's CPU use in cores,
	// averaged over one sample interval.
	CPUSoft, CPUHard float64
	// CPUSoftFraction and CPUHardFraction are the CPU thresholds as
	// fractions of the detected CPU limit, in (0, 1].
	CPUSoftFraction, CPUHardFraction float64
	// Hysteresis is how far below a threshold, as a fraction of it, a
	// reading must fall before the pressure level falls. If zero,
	// DefaultHysteresis.
	Hysteresis float64
	// Grace is how long a reading must stay above the soft threshold before
	// soft pressure starts, and below the recovery line before a level ends.
	// Hard pressure starts at once. If zero, one sample interval: two
	// samples in a row must agree.
	Grace time.Duration
	// SetGoMemoryLimit sets the Go runtime's soft memory limit
	// (debug.SetMemoryLimit) to the soft memory threshold while the Limiter
	// runs, so the garbage collector works harder before shedding starts. It
	// does nothing when GOMEMLIMIT or an earlier SetMemoryLimit call set a
	// limit already, and Close restores the previous one.
	SetGoMemoryLimit bool
}

// enabled reports whether any threshold is set.
func (p ProcessLimits) enabled() bool {
	return p.MemorySoft != 0 || p.MemoryHard != 0 || p.MemorySoftFraction != 0 || p.MemoryHardFraction != 0 ||
		p.CPUSoft != 0 || p.CPUHard != 0 || p.CPUSoftFraction != 0 || p.CPUHardFraction != 0
}

// validate returns one FieldError for each invalid field.
func (p ProcessLimits) validate(path string) []FieldError {
	var fields []FieldError
	add := func(field, format string, args ...any) {
		fields = append(fields, FieldError{path + "." + field, fmt.Sprintf(format, args...)})
	}
	pairs := []struct {
		name     string
		absolute float64
		written  any // the absolute value as the user wrote it, for messages
		fraction float64
	}{
		{"MemorySoft", float64(p.MemorySoft), p.MemorySoft, p.MemorySoftFraction},
		{"MemoryHard", float64(p.MemoryHard), p.MemoryHard, p.MemoryHardFraction},
		{"CPUSoft", p.CPUSoft, p.CPUSoft, p.CPUSoftFraction},
		{"CPUHard", p.CPUHard, p.CPUHard, p.CPUHardFraction},
	}
	for _, pair := range pairs {
		if !(pair.absolute >= 0) || math.IsInf(pair.absolute, 1) { // also rejects NaN
			add(pair.name, "must be a finite number >= 0, got %v (0 means the fraction, or no threshold)", pair.written)
		}
		if !(pair.fraction >= 0 && pair.fraction <= 1) {
			add(pair.name+"Fraction", "must be in [0, 1], got %v (0.8 means 80%% of the detected limit)", pair.fraction)
		}
		if pair.absolute != 0 && pair.fraction != 0 {
			add(pair.name+"Fraction", "must be 0 when %s is set (got %v and %v); set one of the two", pair.name, pair.written, pair.fraction)
		}
	}
	if p.MemorySoft > 0 && p.MemoryHard > 0 && p.MemorySoft > p.MemoryHard {
		add("MemorySoft", "must be <= MemoryHard (%d), got %d", p.MemoryHard, p.MemorySoft)
	}
	if p.CPUSoft > 0 && p.CPUHard > 0 && p.CPUSoft > p.CPUHard {
		add("CPUSoft", "must be <= CPUHard (%v), got %v", p.CPUHard, p.CPUSoft)
	}
	if p.MemorySoftFraction > 0 && p.MemoryHardFraction > 0 && p.MemorySoftFraction > p.MemoryHardFraction {
		add("MemorySoftFraction", "must be <= MemoryHardFraction (%v), got %v", p.MemoryHardFraction, p.MemorySoftFraction)
	}
	if p.CPUSoftFraction > 0 && p.CPUHardFraction > 0 && p.CPUSoftFraction > p.CPUHardFraction {
		add("CPUSoftFraction", "must be <= CPUHardFraction (%v), got %v", p.CPUHardFraction, p.CPUSoftFraction)
	}
	if !(p.Hysteresis >= 0 && p.Hysteresis < 1) {
		add("Hysteresis", "must be in [0, 1), got %v (0.05 means 5%% below the threshold)", p.Hysteresis)
	}
	if p.Grace < 0 {
		add("Grace", "must be >= 0, got %s (0 means one sample interval)", p.Grace)
	}
	return fields
}

// checkResolved returns the errors of thresholds that contradict each other
// only once fractions are taken of the detected limits: a soft threshold
// above the hard one when one of the two is a fraction. It also returns a
// warning for each threshold above the detected limit, which pressure can
// reach only when the limit was detected too low.
func (p ProcessLimits) checkResolved(detected resource.Limits) (fields []FieldError, warnings []string) {
	memory, cpu := p.resolve(detected.MemoryBytes, detected.CPUCores, time.Second)
	if memory.soft > 0 && memory.hard > 0 && memory.soft > memory.hard {
		fields = append(fields, FieldError{"Process.MemorySoft", fmt.Sprintf(
			"must resolve to at most the hard threshold, got %d bytes against %d bytes of a detected limit of %d bytes (%s); lower MemorySoft or MemorySoftFraction, or raise the hard threshold",
			int64(memory.soft), int64(memory.hard), detected.MemoryBytes, detected.MemorySource)})
	}
	if cpu.soft > 0 && cpu.hard > 0 && cpu.soft > cpu.hard {
		fields = append(fields, FieldError{"Process.CPUSoft", fmt.Sprintf(
			"must resolve to at most the hard threshold, got %v cores against %v cores of a detected limit of %v cores (%s); lower CPUSoft or CPUSoftFraction, or raise the hard threshold",
			cpu.soft, cpu.hard, detected.CPUCores, detected.CPUSource)})
	}
	over := func(name string, value, limit float64, format func(float64) string) {
		if limit > 0 && value > limit {
			warnings = append(warnings, fmt.Sprintf("Process.%s is %s, above the detected limit of %s, so pressure reaches it only if the limit was detected too low",
				name, format(value), format(limit)))
		}
	}
	bytes := func(v float64) string { return fmt.Sprintf("%d bytes", int64(v)) }
	cores := func(v float64) string { return fmt.Sprintf("%v cores", v) }
	over("MemorySoft", memory.soft, float64(detected.MemoryBytes), bytes)
	over("MemoryHard", memory.hard, float64(detected.MemoryBytes), bytes)
	over("CPUSoft", cpu.soft, detected.CPUCores, cores)
	over("CPUHard", cpu.hard, detected.CPUCores, cores)
	return fields, warnings
}

// resolve returns the absolute thresholds, with fractions taken of the
// detected limits memLimit (bytes) and cpuLimit (cores). Samples come every
// interval, a little early or late, so a grace period is judged with half an
// interval of slack, at most half the grace: otherwise a tick 1ms early
// would add a whole interval.
func (p ProcessLimits) resolve(memLimit int64, cpuLimit float64, interval time.Duration) (memory, cpu threshold) {
	hysteresis, grace := p.Hysteresis, p.Grace
	if hysteresis == 0 {
		hysteresis = DefaultHysteresis
	}
	if grace == 0 {
		grace = interval
	}
	grace -= min(interval/2, grace/2)
	pick := func(absolute, fraction, limit float64) float64 {
		if absolute > 0 {
			return absolute
		}
		return fraction * limit
	}
	memory = threshold{
		soft:       pick(float64(p.MemorySoft), p.MemorySoftFraction, float64(memLimit)),
		hard:       pick(float64(p.MemoryHard), p.MemoryHardFraction, float64(memLimit)),
		hysteresis: hysteresis,
		grace:      grace,
	}
	cpu = threshold{
		soft:       pick(p.CPUSoft, p.CPUSoftFraction, cpuLimit),
		hard:       pick(p.CPUHard, p.CPUHardFraction, cpuLimit),
		hysteresis: hysteresis,
		grace:      grace,
	}
	return memory, cpu
}
