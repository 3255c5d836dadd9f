package asynqlimit

import (
	"context"
	"log/slog"
	"reflect"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"github.com/redis/go-redis/v9"
	"golang.org/x/time/rate"
)

// The dequeue gate is a go-redis hook on the Redis client of an asynq
// server. asynq dequeues a task before any middleware runs, so without the
// gate a queue over its budget keeps being dequeued, deferred and moved back
// to pending, which costs several Redis scripts per round and reorders the
// queue. The gate recognises asynq's dequeue call for a queue and, while the
// queue has no room, returns redis.Nil without sending it. asynq takes that
// for an empty queue and moves on to the next one.
//
// asynq v0.26.0 dequeues with one Lua script per queue (dequeueCmd in its
// internal/rdb/rdb.go), run with redis.Script.Run, which sends EVALSHA and,
// when Redis replies NOSCRIPT, EVAL. Its arguments are
//
//	EVALSHA <sha1> 4 asynq:{Q}:pending asynq:{Q}:paused asynq:{Q}:active asynq:{Q}:lease <lease expiry> asynq:{Q}:t:
//
// with EVAL and the script's source in place of EVALSHA and <sha1>.
// TestGateDequeueLayout pins this layout against the asynq version in go.mod.
const (
	queueKeyPrefix  = "asynq:{"
	taskKeySuffix   = "}:t:"
	dequeueKeyCount = 4
	// dequeueArgCount counts the command name, the script, the number of
	// keys, the keys and the two script arguments.
	dequeueArgCount = 3 + dequeueKeyCount + 2
)

// dequeueKeySuffixes are the suffixes, after the queue name, of the keys of
// asynq's dequeue script, in order.
var dequeueKeySuffixes = [dequeueKeyCount]string{"}:pending", "}:paused", "}:active", "}:lease"}

const (
	// gateCheckTasks is the number of tasks that the middleware may handle,
	// once the gate is installed, before the gate must have recognised a
	// dequeue call. asynq sends a dequeue call for every task it runs, so a
	// hook on the server's client recognises one before the first task
	// reaches the middleware.
	gateCheckTasks = 20
	// gateTransitTTL bounds how long the gate counts a task that it let asynq
	// dequeue and that has not reached admission. asynq usually hands a
	// dequeued task to its handler within microseconds. A task that never
	// reaches the middleware, such as one whose deadline passed while it was
	// pending, would otherwise keep its queue closed.
	gateTransitTTL = 250 * time.Millisecond
	// gateLogInterval and gateLogBurst limit the log lines of one queue's
	// gate changes, because a queue at its concurrency budget opens and
	// closes once per task.
	gateLogInterval = 10 * time.Second
	gateLogBurst    = 2
)

// The states of a gate.
const (
	// gateUninstalled: no hook is installed, because neither NewServer nor
	// InstrumentRedis added one, or WithoutGate turned the gate off.
	gateUninstalled int32 = iota
	// gateUnconfirmed: a hook is installed and has not recognised a dequeue
	// call yet.
	gateUnconfirmed
	// gateConfirmed: the hook has recognised a dequeue call.
	gateConfirmed
	// gateSwitchedOff: the middleware handled gateCheckTasks tasks while the
	// hook recognised no dequeue call, so the hook passes every command on.
	gateSwitchedOff
)

// gateEpoch is the origin of the gate's monotonic timestamps.
var gateEpoch = time.Now()

// gate is the dequeue gate of one Limiter.
type gate struct {
	l        *Limiter
	disabled bool // WithoutGate
	state    atomic.Int32
	// unconfirmedTasks counts the tasks that the middleware handled while
	// state was gateUnconfirmed.
	unconfirmedTasks atomic.Int64
	// clients holds the clients that have the hook, so that a client gets
	// it once.
	clients sync.Map
}

func newGate(l *Limiter, disabled bool) *gate {
	return &gate{l: l, disabled: disabled}
}

// queueGate is the state of one queue's gate.
type queueGate struct {
	// closed is the gate's last decision for the queue.
	closed atomic.Bool
	// inTransit counts the tasks that the gate let asynq dequeue and that
	// have not reached admission yet, and transitAt is the time of the last
	// one, in nanoseconds since gateEpoch. Without them, the next dequeue
	// call, which asynq sends while the handler of the last task is still
	// starting, would find the queue's slot free.
	inTransit atomic.Int64
	transitAt atomic.Int64
	// logs limits the log lines of the gate's changes, and suppressed counts
	// the changes held back since the last line written.
	logs       *rate.Limiter
	suppressed atomic.Int64
}

func newGateLogLimiter() *rate.Limiter {
	return rate.NewLimiter(rate.Every(gateLogInterval), gateLogBurst)
}

// InstrumentRedis adds the dequeue gate to client, as a go-redis hook. Call
// it on the client that you pass to asynq.NewServerFromRedisClient, before
// the server starts. NewServer does this itself. The gate makes a queue
// without room look empty to asynq's dequeue, so its tasks stay pending, in
// order, instead of being dequeued and deferred. It changes no other
// command, and no pipeline. A go-redis client gets the hook once, however
// often it is passed.
//
// If the middleware then handles 20 tasks while the hook recognises no
// dequeue call, because client is not the server's or asynq changed its
// dequeue script, the gate switches itself off with a warning and sets
// asynqlimit_gate_disabled to 1. With WithoutGate, or a nil client,
// InstrumentRedis does nothing.
func (l *Limiter) InstrumentRedis(client redis.UniversalClient) {
	g := l.gate
	if g.disabled || client == nil {
		return
	}
	// go-redis clients are pointers. A client of another kind may not be
	// comparable, so it cannot be a map key and gets a hook on every call.
	if reflect.TypeOf(client).Kind() == reflect.Pointer {
		if _, loaded := g.clients.LoadOrStore(client, struct{}{}); loaded {
			return
		}
	}
	if g.state.CompareAndSwap(gateUninstalled, gateUnconfirmed) {
		g.unconfirmedTasks.Store(0)
	}
	client.AddHook(gateHook{g: g})
}

// gateHook is the go-redis hook of a gate. It changes only the dequeue
// calls of closed queues.
type gateHook struct{ g *gate }

// DialHook returns next unchanged.
func (h gateHook) DialHook(next redis.DialHook) redis.DialHook { return next }

// ProcessPipelineHook returns next unchanged, because asynq does not dequeue
// in a pipeline.
func (h gateHook) ProcessPipelineHook(next redis.ProcessPipelineHook) redis.ProcessPipelineHook {
	return next
}

// ProcessHook wraps next with the gate.
func (h gateHook) ProcessHook(next redis.ProcessHook) redis.ProcessHook {
	return func(ctx context.Context, cmd redis.Cmder) error {
		return h.g.process(ctx, cmd, next)
	}
}

// process sends cmd on through next. For asynq's dequeue call of a queue
// without room it returns redis.Nil instead, in enforce mode, and asynq
// takes that for an empty queue.
func (g *gate) process(ctx context.Context, cmd redis.Cmder, next redis.ProcessHook) error {
	if g.state.Load() == gateSwitchedOff {
		return next(ctx, cmd)
	}
	name, ok := dequeueQueue(cmd.Args())
	if !ok {
		return next(ctx, cmd)
	}
	if g.state.Load() == gateUnconfirmed {
		g.state.CompareAndSwap(gateUnconfirmed, gateConfirmed)
	}

	q, found := g.l.named[name]
	if !found {
		q = g.l.queue(strings.Clone(name)) // name points into the key
	}
	reason, closed := g.l.gateReason(q, q.gate.transit())
	g.update(q, reason, closed)
	if closed {
		q.metrics.gateSkips.Inc()
		if g.l.limits.Mode == Enforce {
			cmd.SetErr(redis.Nil)
			return redis.Nil
		}
	}

	err := next(ctx, cmd)
	if err == nil { // the script returned a task
		q.gate.transitAt.Store(int64(time.Since(gateEpoch)))
		q.gate.inTransit.Add(1)
	}
	return err
}

// dequeueQueue returns the queue name of asynq's dequeue call, and false
// for any other command.
func dequeueQueue(args []any) (string, bool) {
	if len(args) != dequeueArgCount {
		return "", false
	}
	command, _ := args[0].(string)
	if !strings.EqualFold(command, "evalsha") && !strings.EqualFold(command, "eval") {
		return "", false
	}
	switch n := args[2].(type) {
	case int:
		if n != dequeueKeyCount {
			return "", false
		}
	case int64:
		if n != dequeueKeyCount {
			return "", false
		}
	default:
		return "", false
	}

	pending, _ := args[3].(string)
	if !strings.HasPrefix(pending, queueKeyPrefix) || !strings.HasSuffix(pending, dequeueKeySuffixes[0]) ||
		len(pending) < len(queueKeyPrefix)+len(dequeueKeySuffixes[0])+1 {
		return "", false
	}
	name := pending[len(queueKeyPrefix) : len(pending)-len(dequeueKeySuffixes[0])]
	for i, suffix := range dequeueKeySuffixes[1:] {
		key, _ := args[4+i].(string)
		if !isQueueKey(key, name, suffix) {
			return "", false
		}
	}
	taskPrefix, _ := args[3+dequeueKeyCount+1].(string)
	if !isQueueKey(taskPrefix, name, taskKeySuffix) {
		return "", false
	}
	return name, true
}

// isQueueKey reports whether key is "asynq:{" + queue + suffix, without
// building that string.
func isQueueKey(key, queue, suffix string) bool {
	return len(key) == len(queueKeyPrefix)+len(queue)+len(suffix) &&
		strings.HasPrefix(key, queueKeyPrefix) &&
		key[len(queueKeyPrefix):len(queueKeyPrefix)+len(queue)] == queue &&
		strings.HasSuffix(key, suffix)
}

// transit returns the number of tasks in transit to admission, or 0 once
// the last one is older than gateTransitTTL.
func (qg *queueGate) transit() int64 {
	n := qg.inTransit.Load()
	if n <= 0 {
		return 0
	}
	if time.Since(gateEpoch)-time.Duration(qg.transitAt.Load()) > gateTransitTTL {
		qg.inTransit.CompareAndSwap(n, 0)
		return 0
	}
	return n
}

// endTransit counts a dequeued task out of transit, once the middleware has
// decided on it. It never takes the count below zero, because tasks of a
// client without the hook are never counted in.
func (qg *queueGate) endTransit() {
	for {
		n := qg.inTransit.Load()
		if n <= 0 || qg.inTransit.CompareAndSwap(n, n-1) {
			return
		}
	}
}

// gateReason returns the reason that admission would defer a new task of
// the queue, with true, or false when the queue has room. It reads what
// admission reads, without locks: pressure, the CPU budget, the slots held
// and the memory reserved, and it counts the tasks in transit as holding a
// slot and a reservation each.
func (l *Limiter) gateReason(q *queueState, transit int64) (Reason, bool) {
	b := q.budget
	switch {
	case l.monitor != nil && l.monitor.sheds(b.Priority, 0):
		return ReasonPressure, true
	case q.cpuAccounting && b.CPU > 0 && q.projectedCores(time.Now())+float64(transit)*q.perTaskCores() >= b.CPU:
		return ReasonCPU, true
	case q.slots != nil && q.slotsHeld.Load()+transit >= int64(b.Concurrency):
		return ReasonConcurrency, true
	case q.memory != nil && l.memoryFull(q, transit):
		return ReasonMemory, true
	}
	return "", false
}

// memoryFull reports whether the queue's memory budget has no room for one
// more task.
func (l *Limiter) memoryFull(q *queueState, transit int64) bool {
	free := q.budget.Memory - q.reserved.Load()
	if l.estimator != nil {
		// The next task's estimate is unknown before it is dequeued.
		// NOTE: a task that the estimator would give 0 bytes, which
		// admission lets through a full budget, waits here for room.
		return free <= 0
	}
	need := min(q.budget.TaskMemory, q.budget.Memory)
	return free-transit*need < need
}

// update records the gate's decision for q, and on a change sets the
// gate_closed gauge and logs the change at most gateLogBurst times per
// gateLogInterval.
func (g *gate) update(q *queueState, reason Reason, closed bool) {
	if q.gate.closed.Load() == closed || !q.gate.closed.CompareAndSwap(!closed, closed) {
		return
	}
	if closed {
		q.metrics.gateClosed.Inc()
	} else {
		q.metrics.gateClosed.Dec()
	}

	logger := g.l.logger
	if !logger.Enabled(context.Background(), slog.LevelInfo) {
		return
	}
	if !q.gate.logs.Allow() {
		q.gate.suppressed.Add(1)
		return
	}
	msg := "asynqlimit: dequeue gate opened"
	args := []any{"queue", q.name, "mode", g.l.limits.Mode.String()}
	if closed {
		msg = "asynqlimit: dequeue gate closed, so asynq skips the queue until it has room"
		if g.l.limits.Mode == Observe {
			msg = "asynqlimit: dequeue gate would close, but observe mode lets asynq dequeue"
		}
		args = append(args, "reason", reason)
		args = append(args, g.l.gateNumbers(q, reason)...)
	}
	if n := q.gate.suppressed.Swap(0); n > 0 {
		args = append(args, "suppressed", n)
	}
	logger.Info(msg, args...)
}

// gateNumbers returns the log attributes that compare the queue's use with
// the budget that closed its gate or deferred a task.
func (l *Limiter) gateNumbers(q *queueState, reason Reason) []any {
	switch reason {
	case ReasonConcurrency:
		return []any{"slots_held", q.slotsHeld.Load(), "in_transit", q.gate.transit(), "limit", q.budget.Concurrency}
	case ReasonCPU:
		return []any{"cpu_cores", q.projectedCores(time.Now()), "in_transit", q.gate.transit(),
			"per_task_cores", q.perTaskCores(), "cpu_budget_cores", q.budget.CPU}
	case ReasonMemory:
		return []any{"reserved_bytes", q.reserved.Load(), "in_transit", q.gate.transit(),
			"task_memory_bytes", q.budget.TaskMemory, "memory_budget_bytes", q.budget.Memory}
	case ReasonPressure:
		return l.pressureNumbers(q)
	}
	return nil
}

// pressureNumbers returns the log attributes of a task shed by pressure:
// the priorities shed, and the memory of the last sample with the
// reservations admitted since, which admission compares with the
// thresholds.
func (l *Limiter) pressureNumbers(q *queueState) []any {
	m := l.monitor
	if m == nil {
		return []any{"priority", q.budget.Priority}
	}
	return []any{"priority", q.budget.Priority, "shed_priorities_up_to", shedLabel(m.shedMax.Load()),
		"rss_bytes", m.lastRSS.Load(), "pending_reserved_bytes", m.pending.total(),
		"memory_soft_bytes", int64(m.memory.soft), "memory_hard_bytes", int64(m.memory.hard)}
}

// countTask counts a task of the middleware while the gate has not
// recognised a dequeue call, and switches the gate off after gateCheckTasks
// such tasks.
func (g *gate) countTask() {
	if g.state.Load() != gateUnconfirmed || g.unconfirmedTasks.Add(1) < gateCheckTasks {
		return
	}
	if !g.state.CompareAndSwap(gateUnconfirmed, gateSwitchedOff) {
		return
	}
	g.l.metrics.gateDisabled.Set(1)
	g.l.logger.Warn("asynqlimit: dequeue gate switched off, because the Redis hook recognised no asynq dequeue call "+
		"while the middleware handled tasks. Queues without room are now dequeued and deferred. Pass the client given "+
		"to InstrumentRedis to asynq.NewServerFromRedisClient, or check that asynq is v0.26.0, the version whose "+
		"dequeue call the gate recognises", "tasks", gateCheckTasks)
}
