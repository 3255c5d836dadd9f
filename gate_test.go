package asynqlimit

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"math"
	"runtime/debug"
	"slices"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/hibiken/asynq"
	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/testutil"
	"github.com/redis/go-redis/v9"
)

// dequeueArgs returns the arguments of asynq's dequeue call for queue, as
// go-redis builds them for redis.Script.Run.
func dequeueArgs(command, script, queue string) []any {
	prefix := "asynq:{" + queue + "}:"
	return []any{command, script, 4, prefix + "pending", prefix + "paused", prefix + "active", prefix + "lease",
		int64(1700000000), prefix + "t:"}
}

func TestDequeueQueueRecognition(t *testing.T) {
	const sha = "0123456789abcdef0123456789abcdef01234567"
	withArg := func(args []any, i int, v any) []any {
		args = slices.Clone(args)
		args[i] = v
		return args
	}
	real := dequeueArgs("evalsha", sha, "q")
	tests := []struct {
		name  string
		args  []any
		queue string
		ok    bool
	}{
		{"evalsha", real, "q", true},
		{"eval after NOSCRIPT", dequeueArgs("eval", "return nil", "q"), "q", true},
		{"upper-case command", dequeueArgs("EVALSHA", sha, "q"), "q", true},
		{"key count as int64", withArg(real, 2, int64(4)), "q", true},
		{"queue name with braces and colons", dequeueArgs("evalsha", sha, "a}:b{:c"), "a}:b{:c", true},
		{"queue name with spaces", dequeueArgs("evalsha", sha, "my queue"), "my queue", true},

		{"empty queue name", dequeueArgs("evalsha", sha, ""), "", false},
		{"other command", withArg(real, 0, "evalsha_ro"), "", false},
		{"command not a string", withArg(real, 0, []byte("evalsha")), "", false},
		{"three keys", withArg(real, 2, 3), "", false},
		{"key count as string", withArg(real, 2, "4"), "", false},
		{"paused key of another queue", withArg(real, 4, "asynq:{r}:paused"), "", false},
		{"active key of another queue", withArg(real, 5, "asynq:{r}:active"), "", false},
		{"lease key missing", withArg(real, 6, "asynq:{q}:scheduled"), "", false},
		{"task prefix of another queue", withArg(real, 8, "asynq:{r}:t:"), "", false},
		{"task prefix not a string", withArg(real, 8, 7), "", false},
		{"first key not pending", withArg(real, 3, "asynq:{q}:retry"), "", false},
		{"first key without prefix", withArg(real, 3, "other:{q}:pending"), "", false},
		{"key not a string", withArg(real, 4, 12), "", false},
		{"extra argument", append(slices.Clone(real), "x"), "", false},
		{"missing argument", real[:len(real)-1], "", false},
		{"get of a pending key", []any{"get", "asynq:{q}:pending"}, "", false},
		{"no arguments", nil, "", false},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			queue, ok := dequeueQueue(tt.args)
			if ok != tt.ok {
				t.Errorf("dequeueQueue(%v) ok = %v, want %v", tt.args, ok, tt.ok)
			}
			if queue != tt.queue {
				t.Errorf("dequeueQueue(%v) queue = %q, want %q", tt.args, queue, tt.queue)
			}
		})
	}
}

// fakeDequeue has the key layout of asynq's dequeue script. It counts its
// runs in the queue's active key, so a test can tell whether Redis ran it.
var fakeDequeue = redis.NewScript(`redis.call("INCR", KEYS[3]) return "sent"`)

func dequeueKeys(queue string) []string {
	prefix := "asynq:{" + queue + "}:"
	return []string{prefix + "pending", prefix + "paused", prefix + "active", prefix + "lease"}
}

func runFakeDequeue(ctx context.Context, c redis.Scripter, queue string) (any, error) {
	return fakeDequeue.Run(ctx, c, dequeueKeys(queue), time.Now().Unix(), "asynq:{"+queue+"}:t:").Result()
}

// fakeDequeueRuns returns how often Redis ran fakeDequeue for queue.
func fakeDequeueRuns(t *testing.T, client *redis.Client, queue string) int {
	t.Helper()
	n, err := client.Get(context.Background(), "asynq:{"+queue+"}:active").Int()
	if errors.Is(err, redis.Nil) {
		return 0
	}
	if err != nil {
		t.Fatalf("read the run count of %s: %v", queue, err)
	}
	return n
}

// newGateLimiter returns a Limiter with metrics and logs, closed when the
// test ends.
func newGateLimiter(t *testing.T, limits Limits, opts ...Option) (*Limiter, *syncBuffer) {
	t.Helper()
	logs := &syncBuffer{}
	logger := slog.New(slog.NewTextHandler(logs, &slog.HandlerOptions{Level: slog.LevelDebug}))
	opts = append([]Option{WithRegisterer(prometheus.NewRegistry()), WithLogger(logger)}, opts...)
	l, err := New(limits, opts...)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { l.Close() })
	return l, logs
}

// newTestRedisClient returns a client on a database of its own on the test
// redis-server, closed and flushed when the test ends.
func newTestRedisClient(t *testing.T) *redis.Client {
	t.Helper()
	db := testRedis.NewDB()
	client := redis.NewClient(&redis.Options{Addr: testRedis.Addr, DB: db})
	t.Cleanup(func() {
		client.Close()
		if err := testRedis.FlushDB(db); err != nil {
			t.Errorf("FlushDB(%d): %v", db, err)
		}
	})
	return client
}

func gateSkips(l *Limiter, label string) float64 {
	return testutil.ToFloat64(l.metrics.gateSkips.WithLabelValues(label))
}

func gateClosed(l *Limiter, label string) float64 {
	return testutil.ToFloat64(l.metrics.gateClosed.WithLabelValues(label))
}

func TestGateHookSkipsClosedQueue(t *testing.T) {
	l, _ := newGateLimiter(t, Limits{Queues: map[string]Budget{"full": {Concurrency: 1}, "open": {Concurrency: 1}}})
	client := newTestRedisClient(t)
	l.InstrumentRedis(client)
	ctx := context.Background()
	full := l.named["full"]
	if !full.tryAcquire() {
		t.Fatal("tryAcquire on an empty queue failed")
	}

	if _, err := runFakeDequeue(ctx, client, "full"); !errors.Is(err, redis.Nil) {
		t.Errorf("dequeue of the full queue: err = %v, want redis.Nil", err)
	}
	if got := fakeDequeueRuns(t, client, "full"); got != 0 {
		t.Errorf("Redis ran the dequeue of the full queue %d times, want 0", got)
	}
	if got := gateSkips(l, "full"); got != 1 {
		t.Errorf("gate_skips_total{full} = %v, want 1", got)
	}
	if got := gateClosed(l, "full"); got != 1 {
		t.Errorf("gate_closed{full} = %v, want 1", got)
	}

	res, err := runFakeDequeue(ctx, client, "open")
	if err != nil || res != "sent" {
		t.Errorf("dequeue of the open queue = %v, %v, want sent, nil", res, err)
	}
	if got := gateSkips(l, "open"); got != 0 {
		t.Errorf("gate_skips_total{open} = %v, want 0", got)
	}

	if err := client.Set(ctx, "asynq:{full}:pending", "x", 0).Err(); err != nil {
		t.Errorf("SET through the hook: %v", err)
	}
	if got, err := client.Get(ctx, "asynq:{full}:pending").Result(); err != nil || got != "x" {
		t.Errorf("GET through the hook = %q, %v, want x, nil", got, err)
	}

	pipe := client.Pipeline()
	piped := fakeDequeue.Eval(ctx, pipe, dequeueKeys("full"), time.Now().Unix(), "asynq:{full}:t:")
	if _, err := pipe.Exec(ctx); err != nil {
		t.Errorf("pipeline: %v", err)
	}
	if got, err := piped.Result(); err != nil || got != "sent" {
		t.Errorf("dequeue of the full queue in a pipeline = %v, %v, want sent, nil: pipelines pass untouched", got, err)
	}

	full.release(grant{slot: true})
	if _, err := runFakeDequeue(ctx, client, "full"); err != nil {
		t.Errorf("dequeue of the full queue after its slot was released: %v", err)
	}
	if got := gateClosed(l, "full"); got != 0 {
		t.Errorf("gate_closed{full} after the release = %v, want 0", got)
	}
}

func TestGateObserveModeOnlyCounts(t *testing.T) {
	l, logs := newGateLimiter(t, Limits{Queues: map[string]Budget{"full": {Concurrency: 1}}, Mode: Observe})
	client := newTestRedisClient(t)
	l.InstrumentRedis(client)
	l.named["full"].tryAcquire()

	if res, err := runFakeDequeue(context.Background(), client, "full"); err != nil || res != "sent" {
		t.Errorf("dequeue in observe mode = %v, %v, want sent, nil", res, err)
	}
	if got := gateSkips(l, "full"); got != 1 {
		t.Errorf("gate_skips_total{full} = %v, want 1 in observe mode", got)
	}
	if got := gateClosed(l, "full"); got != 1 {
		t.Errorf("gate_closed{full} = %v, want 1 in observe mode", got)
	}
	if !strings.Contains(logs.String(), "dequeue gate would close") {
		t.Errorf("logs lack the observe-mode gate line:\n%s", logs)
	}
}

func TestGateWithoutGateSendsEverything(t *testing.T) {
	l, _ := newGateLimiter(t, Limits{Queues: map[string]Budget{"full": {Concurrency: 1}}}, WithoutGate())
	client := newTestRedisClient(t)
	l.InstrumentRedis(client)
	l.named["full"].tryAcquire()

	if _, err := runFakeDequeue(context.Background(), client, "full"); err != nil {
		t.Errorf("dequeue with WithoutGate: %v", err)
	}
	if got := fakeDequeueRuns(t, client, "full"); got != 1 {
		t.Errorf("Redis ran the dequeue %d times, want 1", got)
	}
	if got := l.gate.state.Load(); got != gateUninstalled {
		t.Errorf("gate state = %d, want gateUninstalled (%d)", got, gateUninstalled)
	}
}

// uncomparableClient is a Redis client whose type cannot be a map key.
type uncomparableClient struct {
	*redis.Client
	tags []string
}

func TestInstrumentRedisUncomparableClient(t *testing.T) {
	l, _ := newGateLimiter(t, Limits{Queues: map[string]Budget{"full": {Concurrency: 1}}})
	client := newTestRedisClient(t)
	l.InstrumentRedis(uncomparableClient{Client: client, tags: []string{"a"}})
	l.named["full"].tryAcquire()
	if _, err := runFakeDequeue(context.Background(), client, "full"); !errors.Is(err, redis.Nil) {
		t.Errorf("dequeue of the full queue: err = %v, want redis.Nil", err)
	}
}

func TestGateCountsTaskInTransit(t *testing.T) {
	l, _ := newGateLimiter(t, Limits{Queues: map[string]Budget{"q": {Concurrency: 1}}})
	client := newTestRedisClient(t)
	l.InstrumentRedis(client)
	l.InstrumentRedis(client) // a second call adds no second hook
	ctx := context.Background()
	q := l.named["q"]

	if _, err := runFakeDequeue(ctx, client, "q"); err != nil {
		t.Fatalf("first dequeue: %v", err)
	}
	if got := q.gate.inTransit.Load(); got != 1 {
		t.Fatalf("in transit after one dequeue = %d, want 1", got)
	}
	if _, err := runFakeDequeue(ctx, client, "q"); !errors.Is(err, redis.Nil) {
		t.Errorf("second dequeue before the first task reached admission: err = %v, want redis.Nil", err)
	}

	q.gate.endTransit()
	if _, err := runFakeDequeue(ctx, client, "q"); err != nil {
		t.Errorf("dequeue after the task left transit: %v", err)
	}
	q.gate.endTransit()
	q.gate.endTransit() // a task that was never counted in
	if got := q.gate.inTransit.Load(); got != 0 {
		t.Errorf("in transit = %d, want 0: endTransit must not go below zero", got)
	}

	q.gate.inTransit.Store(1)
	q.gate.transitAt.Store(int64(time.Since(gateEpoch) - 2*gateTransitTTL))
	if got := q.gate.transit(); got != 0 {
		t.Errorf("transit() of a task older than gateTransitTTL = %d, want 0", got)
	}
}

func TestGateReasons(t *testing.T) {
	limits := Limits{
		Queues: map[string]Budget{
			"cap":    {Concurrency: 2},
			"memory": {Memory: 100, TaskMemory: 40},
			"cpu":    {CPU: 1},
			"free":   {Priority: 1},
		},
		Process: ProcessLimits{MemorySoft: 100},
	}
	l, _, _ := newMonitoredLimiter(t, limits)
	check := func(queue string, transit int64, want Reason, wantClosed bool) {
		t.Helper()
		reason, closed := l.gateReason(l.named[queue], transit)
		if closed != wantClosed || reason != want {
			t.Errorf("gateReason(%s, transit %d) = %q, %v, want %q, %v", queue, transit, reason, closed, want, wantClosed)
		}
	}

	capQ := l.named["cap"]
	check("cap", 0, "", false)
	capQ.tryAcquire()
	check("cap", 0, "", false)
	check("cap", 1, ReasonConcurrency, true)
	capQ.tryAcquire()
	check("cap", 0, ReasonConcurrency, true)

	memQ := l.named["memory"]
	check("memory", 0, "", false)
	check("memory", 2, ReasonMemory, true) // 100 - 2*40 < 40
	memQ.reserved.Store(60)
	check("memory", 0, "", false) // 40 bytes free: room for one task
	memQ.reserved.Store(61)
	check("memory", 0, ReasonMemory, true)
	memQ.reserved.Store(0)

	cpuQ := l.named["cpu"]
	if cpuQ.cpuAccounting {
		cpuQ.cpu.cores.Store(math.Float64bits(0.5))
		check("cpu", 0, "", false)
		cpuQ.cpu.perTask.Store(math.Float64bits(0.25))
		check("cpu", 1, "", false)       // 0.5 + 0.25 for the task in transit
		check("cpu", 2, ReasonCPU, true) // 0.5 + 2 * 0.25 reaches the budget of 1
		cpuQ.cpu.cores.Store(math.Float64bits(1))
		check("cpu", 0, ReasonCPU, true)
	}

	l.monitor.shedMax.Store(0) // as soft pressure sheds priority 0
	check("cap", 0, ReasonPressure, true)
	check("free", 0, "", false)
}

func TestGateMemoryWithEstimator(t *testing.T) {
	l, _ := newGateLimiter(t, Limits{Queues: map[string]Budget{"m": {Memory: 100}}},
		WithMemoryEstimator(func(string, *asynq.Task) int64 { return 30 }))
	q := l.named["m"]
	q.reserved.Store(90)
	if _, closed := l.gateReason(q, 0); closed {
		t.Errorf("gate closed with 10 of 100 bytes free and an estimator, want open: the next estimate is unknown")
	}
	q.reserved.Store(100)
	if reason, closed := l.gateReason(q, 0); !closed || reason != ReasonMemory {
		t.Errorf("gateReason with the budget fully reserved = %q, %v, want memory, true", reason, closed)
	}
}

// runTasks runs n tasks through the middleware of l with a handler that
// returns nil.
func runTasks(t *testing.T, l *Limiter, n int) {
	t.Helper()
	h := l.Middleware()(asynq.HandlerFunc(func(context.Context, *asynq.Task) error { return nil }))
	for range n {
		if err := h.ProcessTask(context.Background(), asynq.NewTask("work", nil)); err != nil {
			t.Fatalf("ProcessTask: %v", err)
		}
	}
}

func TestGateSwitchesOffWithoutDequeueCall(t *testing.T) {
	l, logs := newGateLimiter(t, Limits{Queues: map[string]Budget{"full": {Concurrency: 1}}})
	client := newTestRedisClient(t)
	l.InstrumentRedis(client) // a client that asynq never dequeues through

	runTasks(t, l, gateCheckTasks-1)
	if got := l.gate.state.Load(); got != gateUnconfirmed {
		t.Fatalf("gate state after %d tasks = %d, want gateUnconfirmed (%d)", gateCheckTasks-1, got, gateUnconfirmed)
	}
	runTasks(t, l, 1)
	if got := l.gate.state.Load(); got != gateSwitchedOff {
		t.Fatalf("gate state after %d tasks = %d, want gateSwitchedOff (%d)", gateCheckTasks, got, gateSwitchedOff)
	}
	if got := testutil.ToFloat64(l.metrics.gateDisabled); got != 1 {
		t.Errorf("gate_disabled = %v, want 1", got)
	}
	runTasks(t, l, 3*gateCheckTasks)
	if got := strings.Count(logs.String(), "dequeue gate switched off"); got != 1 {
		t.Errorf("switch-off warnings = %d, want 1:\n%s", got, logs)
	}

	l.named["full"].tryAcquire()
	if _, err := runFakeDequeue(context.Background(), client, "full"); err != nil {
		t.Errorf("dequeue of a full queue after the switch-off: %v, want it sent", err)
	}
	if got := gateSkips(l, "full"); got != 0 {
		t.Errorf("gate_skips_total{full} after the switch-off = %v, want 0", got)
	}
}

func TestGateStaysOnOnceConfirmed(t *testing.T) {
	l, logs := newGateLimiter(t, Limits{Queues: map[string]Budget{"q": {}}})
	client := newTestRedisClient(t)
	l.InstrumentRedis(client)
	if _, err := runFakeDequeue(context.Background(), client, "q"); err != nil {
		t.Fatalf("dequeue: %v", err)
	}
	runTasks(t, l, 3*gateCheckTasks)
	if got := l.gate.state.Load(); got != gateConfirmed {
		t.Errorf("gate state = %d, want gateConfirmed (%d)", got, gateConfirmed)
	}
	if got := testutil.ToFloat64(l.metrics.gateDisabled); got != 0 {
		t.Errorf("gate_disabled = %v, want 0", got)
	}
	if strings.Contains(logs.String(), "switched off") {
		t.Errorf("logs have a switch-off warning:\n%s", logs)
	}
}

func TestGateUninstalledNeverSwitchesOff(t *testing.T) {
	l, logs := newGateLimiter(t, Limits{})
	runTasks(t, l, 3*gateCheckTasks)
	if got := l.gate.state.Load(); got != gateUninstalled {
		t.Errorf("gate state = %d, want gateUninstalled (%d)", got, gateUninstalled)
	}
	if strings.Contains(logs.String(), "switched off") {
		t.Errorf("logs have a switch-off warning without a hook:\n%s", logs)
	}
}

func TestGateFlappingLogsAreLimited(t *testing.T) {
	l, logs := newGateLimiter(t, Limits{Queues: map[string]Budget{"q": {Concurrency: 1}}})
	q := l.named["q"]
	const changes = 1000
	for i := range changes {
		l.gate.update(q, ReasonConcurrency, i%2 == 0)
	}
	if got := strings.Count(logs.String(), "dequeue gate"); got != gateLogBurst {
		t.Errorf("gate log lines after %d changes = %d, want %d:\n%s", changes, got, gateLogBurst, logs)
	}
	if got := q.gate.suppressed.Load(); got != changes-gateLogBurst {
		t.Errorf("suppressed changes = %d, want %d", got, changes-gateLogBurst)
	}
	if got := gateClosed(l, "q"); got != 0 {
		t.Errorf("gate_closed{q} after an even number of changes = %v, want 0", got)
	}
	if !strings.Contains(logs.String(), "reason=concurrency") {
		t.Errorf("the closed line lacks its reason:\n%s", logs)
	}
}

func TestGateOtherLabelCountsClosedQueues(t *testing.T) {
	l, _ := newGateLimiter(t, Limits{Default: Budget{Concurrency: 1}})
	for _, name := range []string{"x", "y"} {
		l.gate.update(l.queue(name), ReasonConcurrency, true)
	}
	if got := gateClosed(l, otherLabel); got != 2 {
		t.Errorf("gate_closed{other} with two unnamed queues closed = %v, want 2", got)
	}
	l.gate.update(l.queue("x"), "", false)
	if got := gateClosed(l, otherLabel); got != 1 {
		t.Errorf("gate_closed{other} after one opened = %v, want 1", got)
	}
}

func TestNewServerClosesItsRedisClient(t *testing.T) {
	redisOpt := asynq.RedisClientOpt{Addr: testRedis.Addr, DB: testRedis.NewDB()}
	srv, err := NewServer(redisOpt, asynq.Config{LogLevel: asynq.ErrorLevel}, Limits{})
	if err != nil {
		t.Fatal(err)
	}
	if err := srv.client.Ping(context.Background()).Err(); err != nil {
		t.Fatalf("Ping before Shutdown: %v", err)
	}
	srv.Shutdown()
	if err := srv.client.Ping(context.Background()).Err(); !errors.Is(err, redis.ErrClosed) {
		t.Errorf("Ping after Shutdown: err = %v, want redis.ErrClosed", err)
	}
	srv.Shutdown() // a second Shutdown closes nothing twice
}

// commandRecorder is a go-redis hook that records the arguments of every
// command, and of every command sent in a pipeline.
type commandRecorder struct {
	mu        sync.Mutex
	commands  [][]any
	pipelined [][]any
}

func (r *commandRecorder) DialHook(next redis.DialHook) redis.DialHook { return next }

func (r *commandRecorder) ProcessHook(next redis.ProcessHook) redis.ProcessHook {
	return func(ctx context.Context, cmd redis.Cmder) error {
		r.mu.Lock()
		r.commands = append(r.commands, slices.Clone(cmd.Args()))
		r.mu.Unlock()
		return next(ctx, cmd)
	}
}

func (r *commandRecorder) ProcessPipelineHook(next redis.ProcessPipelineHook) redis.ProcessPipelineHook {
	return func(ctx context.Context, cmds []redis.Cmder) error {
		r.mu.Lock()
		for _, cmd := range cmds {
			r.pipelined = append(r.pipelined, slices.Clone(cmd.Args()))
		}
		r.mu.Unlock()
		return next(ctx, cmds)
	}
}

// asynqVersion returns the version of asynq in the test binary.
func asynqVersion() string {
	if info, ok := debug.ReadBuildInfo(); ok {
		for _, dep := range info.Deps {
			if dep.Path == "github.com/hibiken/asynq" {
				return dep.Version
			}
		}
	}
	return "the version in go.mod"
}

// TestGateDequeueLayout records every command that a real asynq.Server and
// asynq.Client send while a task is enqueued and processed, and checks that
// the gate recognises the dequeue calls, and only them. When it fails after
// an asynq upgrade, the gate no longer recognises asynq's dequeue call, so
// update dequeueQueue to the new layout.
func TestGateDequeueLayout(t *testing.T) {
	client := newTestRedisClient(t)
	recorder := &commandRecorder{}
	client.AddHook(recorder)

	producer := asynq.NewClientFromRedisClient(client)
	if _, err := producer.Enqueue(asynq.NewTask("work", nil), asynq.Queue("layout")); err != nil {
		t.Fatal(err)
	}
	done := make(chan struct{})
	srv := asynq.NewServerFromRedisClient(client, asynq.Config{
		Concurrency: 2, Queues: map[string]int{"layout": 1},
		TaskCheckInterval: 50 * time.Millisecond, LogLevel: asynq.ErrorLevel,
	})
	if err := srv.Start(asynq.HandlerFunc(func(context.Context, *asynq.Task) error {
		close(done)
		return nil
	})); err != nil {
		t.Fatal(err)
	}
	select {
	case <-done:
	case <-time.After(10 * time.Second):
		t.Error("the task was not processed within 10s")
	}
	srv.Shutdown()

	recorder.mu.Lock()
	defer recorder.mu.Unlock()
	version := asynqVersion()
	prefix := "asynq:{layout}:"
	dequeues := 0
	for _, args := range recorder.commands {
		isDequeue := len(args) > 3 && args[3] == prefix+"pending" &&
			(args[0] == "evalsha" || args[0] == "eval")
		queue, recognised := dequeueQueue(args)
		if !isDequeue {
			if recognised {
				t.Errorf("asynq %s: the gate recognised %v as a dequeue call of %q", version, args, queue)
			}
			continue
		}
		dequeues++
		if !recognised || queue != "layout" {
			t.Errorf("asynq %s: the gate did not recognise the dequeue call %v (got %q, %v)", version, args, queue, recognised)
		}
		if len(args) != dequeueArgCount {
			t.Errorf("asynq %s: dequeue call has %d arguments, want %d: %v", version, len(args), dequeueArgCount, args)
			continue
		}
		if args[2] != 4 {
			t.Errorf("asynq %s: dequeue key count = %#v, want int 4", version, args[2])
		}
		wantKeys := []any{prefix + "pending", prefix + "paused", prefix + "active", prefix + "lease"}
		if got := args[3:7]; !slices.Equal(got, wantKeys) {
			t.Errorf("asynq %s: dequeue keys = %v, want %v", version, got, wantKeys)
		}
		if _, ok := args[7].(int64); !ok {
			t.Errorf("asynq %s: dequeue ARGV[1] = %#v, want the lease expiry as int64", version, args[7])
		}
		if args[8] != prefix+"t:" {
			t.Errorf("asynq %s: dequeue ARGV[2] = %#v, want %q", version, args[8], prefix+"t:")
		}
	}
	if dequeues == 0 {
		t.Errorf("asynq %s sent no dequeue call of the shape EVALSHA <sha> 4 %spending ...; recorded:\n%s",
			version, prefix, formatCommands(recorder.commands))
	}
	for _, args := range recorder.pipelined {
		if _, recognised := dequeueQueue(args); recognised {
			t.Errorf("asynq %s sent a dequeue call in a pipeline, which the gate passes untouched: %v", version, args)
		}
	}
}

func formatCommands(commands [][]any) string {
	var b strings.Builder
	for _, args := range commands {
		fmt.Fprintln(&b, args...)
	}
	return b.String()
}

// TestGateClosedQueueLooksEmptyToAsynq checks, on a real asynq.Server, that
// asynq takes the gate's redis.Nil for an empty queue: it moves on to the
// next queue, and leaves the closed queue's task pending without a retry.
func TestGateClosedQueueLooksEmptyToAsynq(t *testing.T) {
	h := newHarness(t, Limits{Queues: map[string]Budget{"held": {Concurrency: 1}, "free": {}}}, asynq.Config{
		Concurrency: 2,
		Queues:      map[string]int{"held": 1, "free": 1},
	})
	heldQueue := h.srv.limiter.named["held"]
	if !heldQueue.tryAcquire() {
		t.Fatal("tryAcquire on an empty queue failed")
	}
	waiting := h.enqueue("held", "work", nil)
	h.enqueue("free", "work", nil)
	h.start(asynq.HandlerFunc(func(context.Context, *asynq.Task) error { return nil }))

	h.waitSettled("free", 10*time.Second)
	waitFor(t, 5*time.Second, func() bool { return gateSkips(h.srv.limiter, "held") >= 3 },
		func() string { return "the gate skipped the held queue fewer than 3 times" })
	info := h.taskInfo("held", waiting.ID)
	if info.State != asynq.TaskStatePending {
		t.Errorf("task of the closed queue is %v, want pending", info.State)
	}
	if info.Retried != 0 {
		t.Errorf("task of the closed queue has Retried = %d, want 0", info.Retried)
	}
	if got := h.deferrals("held", ReasonConcurrency); got != 0 {
		t.Errorf("deferrals{held} = %v, want 0: the task must not be dequeued", got)
	}

	heldQueue.release(grant{slot: true})
	h.waitSettled("held", 10*time.Second)
	// The gauge changes at the next dequeue call.
	waitFor(t, 5*time.Second, func() bool { return gateClosed(h.srv.limiter, "held") == 0 },
		func() string { return "gate_closed{held} stayed 1 after the queue drained" })
}

// saturatedRun is the result of runSaturatedQueue.
type saturatedRun struct {
	order       []int // payload indexes of the slow tasks, in handler start order
	deferrals   float64
	skips       float64
	fastSettled bool // every fast task completed while slow tasks were still pending
}

// runSaturatedQueue runs a backlog of slow tasks on a queue with a
// concurrency budget of 1, beside a queue of quick tasks enqueued once the
// slow queue is saturated.
func runSaturatedQueue(t *testing.T, opts ...Option) saturatedRun {
	const slowTasks, fastTasks = 12, 20
	const slowFor = 100 * time.Millisecond
	h := newHarness(t, Limits{Queues: map[string]Budget{
		"slow": fastDefer(Budget{Concurrency: 1}),
		"fast": fastDefer(Budget{}),
	}}, asynq.Config{Concurrency: 4, Queues: map[string]int{"slow": 1, "fast": 1}}, opts...)
	for i := range slowTasks {
		h.enqueue("slow", "slow", []byte{byte(i)}, asynq.MaxRetry(3))
	}

	var mu sync.Mutex
	var run saturatedRun
	mux := asynq.NewServeMux()
	mux.HandleFunc("slow", func(_ context.Context, task *asynq.Task) error {
		mu.Lock()
		run.order = append(run.order, int(task.Payload()[0]))
		mu.Unlock()
		time.Sleep(slowFor)
		return nil
	})
	mux.HandleFunc("fast", func(context.Context, *asynq.Task) error { return nil })
	h.start(mux)

	waitFor(t, 5*time.Second, func() bool { return h.queueInfo("slow").Active > 0 },
		func() string { return "no slow task became active" })
	for range fastTasks {
		h.enqueue("fast", "fast", nil, asynq.MaxRetry(3))
	}
	h.waitSettled("fast", 10*time.Second)
	run.fastSettled = h.queueInfo("slow").Pending+h.queueInfo("slow").Retry > 0

	info := h.waitSettled("slow", 30*time.Second)
	if info.Completed != slowTasks {
		t.Errorf("slow tasks completed = %d, want %d", info.Completed, slowTasks)
	}
	mu.Lock()
	defer mu.Unlock()
	run.deferrals = h.deferrals("slow", ReasonConcurrency)
	run.skips = gateSkips(h.srv.limiter, "slow")
	return run
}

func TestGateSaturatedQueue(t *testing.T) {
	t.Run("with gate", func(t *testing.T) {
		run := runSaturatedQueue(t)
		if run.deferrals != 0 {
			t.Errorf("deferrals of the saturated queue = %v, want 0", run.deferrals)
		}
		if run.skips == 0 {
			t.Errorf("gate_skips_total{slow} = 0, want > 0: the gate never closed")
		}
		if !slices.IsSorted(run.order) {
			t.Errorf("slow tasks started in order %v, want enqueue order", run.order)
		}
		if !run.fastSettled {
			t.Errorf("the fast queue completed only after the slow backlog, want it served beside the saturated queue")
		}
	})
	t.Run("without gate", func(t *testing.T) {
		run := runSaturatedQueue(t, WithoutGate())
		if run.deferrals == 0 {
			t.Errorf("deferrals of the saturated queue = 0, want > 0: the test did not saturate the queue")
		}
		if run.skips != 0 {
			t.Errorf("gate_skips_total{slow} = %v, want 0 with WithoutGate", run.skips)
		}
		t.Logf("without the gate: %v deferrals, start order %v", run.deferrals, run.order)
	})
}
