package asynqlimit

import (
	"fmt"
	"math"
	"math/rand/v2"
	"sync"
	"sync/atomic"
	"time"

	"golang.org/x/sync/semaphore"
	"golang.org/x/time/rate"
)

// Default deferral delays, used when a Budget leaves them zero.
const (
	DefaultDeferDelay    = time.Second
	DefaultMaxDeferDelay = 10 * time.Second
)

// Budget is the set of limits on what the tasks of one queue may use in this
// process.
//
// A task whose queue is full is deferred: it goes back to asynq's retry set
// without spending a retry and comes back after a delay. A task on its last
// attempt (Retried >= MaxRetry, which includes every task enqueued with
// asynq.MaxRetry(0)) cannot be deferred, because asynq archives such a task on
// any error. It waits in the middleware for room instead, holding one of the
// server's Config.Concurrency workers, until its context ends. If the
// context ends first, asynq archives the task, as it archives any
// last-attempt task that times out.
type Budget struct {
	// Concurrency is the maximum number of handlers of the queue that run at
	// once in this process, abandoned handlers included. If zero, the queue
	// has no concurrency cap.
	Concurrency int
	// Timeout is the default and the maximum run time of a task of the queue:
	// the handler's context ends at the earlier of the task's own deadline
	// and the start of the handler plus Timeout. Unlike asynq's own timeouts
	// it may be below one second. If zero, only the task's own deadline
	// applies.
	Timeout time.Duration
	// MaxPayload is the largest payload, in bytes, that a task of the queue
	// may have. A larger task is archived without running. If zero, payloads
	// are not checked.
	MaxPayload int
	// Priority orders queues for shedding under process pressure: lower
	// values are shed first. The zero value is the lowest priority that is
	// not negative.
	Priority int
	// DeferDelay is the delay of the first deferral after the queue becomes
	// full. While the queue stays full the delay doubles each DeferDelay,
	// up to MaxDeferDelay, and each delay gets up to 50% random jitter.
	// If zero, DefaultDeferDelay. asynq (v0.26.0) stores the retry time in
	// whole seconds and moves a deferred task back to pending on its
	// DelayedTaskCheckInterval tick (5s unless set), so delays are in effect
	// rounded to those steps and jitter below one second is lost.
	DeferDelay time.Duration
	// MaxDeferDelay caps the deferral delay. If zero, DefaultMaxDeferDelay.
	MaxDeferDelay time.Duration
	// Memory is the memory, in bytes, that the running tasks of the queue
	// may reserve together. Each task reserves TaskMemory, or what the
	// WithMemoryEstimator function returns for it (0 if that is negative),
	// until its handler returns. A reservation above Memory is capped at
	// Memory, so one task always fits an empty queue. A task that does not
	// fit is deferred with reason "memory". Go cannot measure the memory of
	// one goroutine, so this is a budget of estimates. If zero, the queue
	// has no memory budget.
	Memory int64
	// TaskMemory is the memory reservation of one task in bytes, used when
	// no WithMemoryEstimator function is given. It also orders preemption
	// under hard memory pressure, largest first.
	//
	// With a memory threshold in Limits.Process, admission adds the
	// reservations of the running tasks that the samples do not show yet,
	// and the new task's own, to the last sample's resident memory. A
	// reservation counts until the task finishes or the resident memory has
	// grown by as much. If the sum
	// would cross a threshold that the sample was below, the task is
	// deferred with reason "pressure". Crossing soft sheds the lowest
	// priority, and crossing hard sheds every priority but the highest.
	// The highest priority is never shed this way. So tasks can be deferred
	// for pressure while asynqlimit_pressure still reads 0.
	TaskMemory int64
	// CPU is the CPU, in cores, that the queue's tasks may use together,
	// averaged over the CPU window (WithCPUWindow). While the queue is over
	// it, its new tasks are deferred with reason "cpu". Each task's CPU time
	// is read from the clock of the OS thread its handler is locked to, on
	// Linux only, and other systems enforce no CPU budget. CPU used by
	// goroutines the handler starts, and by the garbage collector's
	// background workers, is not counted. Each running task holds an OS
	// thread of its own, and its handler pays more than an unlocked
	// goroutine each time it blocks and wakes up.
	// BenchmarkBlockingWhileLocked measured 12 to 36 µs per channel round
	// trip, against 0.3 µs unlocked, on 2 AMD EPYC vCPUs with Linux 6.18.
	// A handler that calls runtime.UnlockOSThread more often than
	// runtime.LockOSThread leaves the thread while it is measured, and the
	// CPU time of the goroutines that run on the thread afterwards counts as
	// the task's, for CPU and TaskCPU. WithoutCPUAccounting turns the
	// measurement off. Without TaskCPU, and without a Timeout shorter than
	// asynq's, the handler may run in asynq's goroutine. The package
	// documentation lists when, and what changes then. If
	// zero, the queue has no CPU budget.
	CPU float64
	// TaskCPU is the CPU time one task may use, measured as for CPU. A task
	// over it has its context ended and counts as timed_out. It is checked
	// at each sample interval (WithSampleInterval), so a task can use up to
	// one interval more CPU time before its context ends. If zero, there is
	// no limit.
	TaskCPU time.Duration
}

// validate returns one FieldError for each invalid field, with paths under
// path.
func (b Budget) validate(path string) []FieldError {
	var fields []FieldError
	check := func(ok bool, field, format string, args ...any) {
		if !ok {
			fields = append(fields, FieldError{path + "." + field, fmt.Sprintf(format, args...)})
		}
	}
	check(b.Concurrency >= 0, "Concurrency", "must be >= 0, got %d (0 means no cap)", b.Concurrency)
	check(b.Timeout >= 0, "Timeout", "must be >= 0, got %s (0 means the task's own deadline)", b.Timeout)
	check(b.MaxPayload >= 0, "MaxPayload", "must be >= 0 bytes, got %d (0 means no cap)", b.MaxPayload)
	check(b.DeferDelay >= 0, "DeferDelay", "must be >= 0, got %s (0 means %s)", b.DeferDelay, DefaultDeferDelay)
	check(b.Memory >= 0, "Memory", "must be >= 0 bytes, got %d (0 means no memory budget)", b.Memory)
	check(b.TaskMemory >= 0, "TaskMemory", "must be >= 0 bytes, got %d", b.TaskMemory)
	check(b.CPU >= 0, "CPU", "must be >= 0 cores, got %v (0 means no CPU budget)", b.CPU)
	check(b.TaskCPU >= 0, "TaskCPU", "must be >= 0, got %s (0 means no limit)", b.TaskCPU)
	check(b.MaxDeferDelay >= 0, "MaxDeferDelay", "must be >= 0, got %s (0 means %s)", b.MaxDeferDelay, DefaultMaxDeferDelay)
	if b.MaxDeferDelay > 0 && b.deferDelay() > b.MaxDeferDelay {
		check(false, "MaxDeferDelay", "must be >= DeferDelay (%s), got %s", b.deferDelay(), b.MaxDeferDelay)
	}
	return fields
}

func (b Budget) deferDelay() time.Duration {
	if b.DeferDelay > 0 {
		return b.DeferDelay
	}
	return DefaultDeferDelay
}

func (b Budget) maxDeferDelay() time.Duration {
	if b.MaxDeferDelay > 0 {
		return b.MaxDeferDelay
	}
	return max(DefaultMaxDeferDelay, b.deferDelay())
}

// queueState is the accounting of one queue in this process.
type queueState struct {
	name   string
	label  string
	budget Budget

	// slots caps the running handlers; nil when the budget has no
	// concurrency cap. Its waiters are served in order, so a last-attempt
	// task that waits is not overtaken by tasks that arrive later.
	slots *semaphore.Weighted
	// slotsHeld counts the slots taken from slots, and reserved the bytes
	// taken from memory. Each moves in step with its semaphore, so that the
	// dequeue gate can read them without a lock.
	slotsHeld atomic.Int64
	// memory holds the queue's memory budget in bytes; nil without one.
	memory   *semaphore.Weighted
	reserved atomic.Int64
	// runs holds the running tasks, for preemption and CPU accounting, when
	// tracked is true.
	tracked bool
	runsMu  sync.Mutex
	runs    map[*taskRun]struct{}
	// cpuAccounting is true when the queue has a CPU budget or a TaskCPU
	// limit and thread CPU time can be measured.
	cpuAccounting bool
	cpu           queueCPU
	// inFlight counts handlers that have not returned, abandoned ones
	// included.
	inFlight atomic.Int64
	// fullSince is the Unix time in nanoseconds of the first deferral since
	// the queue last had room, or 0 while it has room.
	fullSince atomic.Int64
	// gate is the state of the queue's dequeue gate.
	gate queueGate

	metrics queueMetrics
	// logs limits the log lines of the queue: index 0 for info and debug
	// lines, 1 for warnings and errors, so that a flood of deferrals cannot
	// hide a rejection or an abandoned handler.
	logs [2]*rate.Limiter
	// suppressed counts the log lines that each of logs held back since the
	// last one written.
	suppressed [2]atomic.Int64
}

func (l *Limiter) newQueueState(name, label string, b Budget) *queueState {
	q := &queueState{
		name:    name,
		label:   label,
		budget:  b,
		metrics: l.metrics.forQueue(label),
		logs: [2]*rate.Limiter{
			rate.NewLimiter(rate.Every(l.logEvery), l.logBurst),
			rate.NewLimiter(rate.Every(l.logEvery), l.logBurst),
		},
	}
	q.gate.logs = newGateLogLimiter()
	q.cpu.base = time.Now()
	if b.Concurrency > 0 {
		q.slots = semaphore.NewWeighted(int64(b.Concurrency))
	}
	if b.Memory > 0 {
		q.memory = semaphore.NewWeighted(b.Memory)
	}
	q.cpuAccounting = l.cpuAccounting && (b.CPU > 0 || b.TaskCPU > 0)
	q.cpu.perTask.Store(math.Float64bits(1))
	q.tracked = l.tracksRuns || q.cpuAccounting
	if q.tracked {
		q.runs = make(map[*taskRun]struct{})
	}
	return q
}

// tryAcquire takes a slot if the queue has room now.
func (q *queueState) tryAcquire() bool {
	if q.slots == nil {
		q.fullSince.Store(0)
		return true
	}
	if q.slots.TryAcquire(1) {
		q.slotsHeld.Add(1)
		q.fullSince.Store(0)
		return true
	}
	return false
}

// grant is the set of budget shares that an admitted task holds until its
// handler returns.
type grant struct {
	// slot is true when the task holds a concurrency slot.
	slot bool
	// memory is the number of bytes held from the queue's memory budget.
	memory int64
	// reservation is the task's memory estimate in bytes, held or not: the
	// order of preemption and the pending memory of the process.
	reservation int64
	// unseen is the task's entry in the process's unseen reservations, nil
	// without one. cpuEpoch is the epoch in which the CPU ramp of a queue
	// with a CPU budget counted the task.
	unseen   *unseenEntry
	cpuEpoch uint64
}

// release returns what g holds.
func (q *queueState) release(g grant) {
	if g.slot {
		q.slots.Release(1)
		q.slotsHeld.Add(-1)
	}
	if g.memory > 0 {
		q.memory.Release(g.memory)
		q.reserved.Add(-g.memory)
		q.metrics.memoryReserved.Sub(float64(g.memory))
	}
}

// deferDelay returns the delay for a deferral at now: DeferDelay doubled
// once for each DeferDelay the queue has been full, capped, with jitter so
// that deferred tasks do not all return on the same tick.
func (q *queueState) deferDelay(now time.Time) time.Duration {
	since := q.fullSince.Load()
	if since == 0 {
		q.fullSince.CompareAndSwap(0, now.UnixNano())
		since = now.UnixNano()
	}
	base, limit := q.budget.deferDelay(), q.budget.maxDeferDelay()
	delay := base
	for steps := time.Duration(now.UnixNano()-since) / base; steps > 0 && delay < limit; steps-- {
		if delay > limit/2 {
			delay = limit // doubling would pass the limit, or overflow
			break
		}
		delay *= 2
	}
	return delay - rand.N(delay/2+1)
}
