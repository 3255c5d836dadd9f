package asynqlimit

import (
	"context"
	"math/rand/v2"
	"sync/atomic"
	"testing"
	"time"

	"github.com/hibiken/asynq"
	"github.com/prometheus/client_golang/prometheus"
)

// benchBudget has the budgets of the core middleware on, with limits that a
// no-op task never reaches.
var benchBudget = Budget{Concurrency: 1 << 20, Timeout: time.Minute, MaxPayload: 1024}

// benchLimiter returns a Limiter with budget as its default and metrics
// registered. It is closed when the benchmark ends.
func benchLimiter(b *testing.B, budget Budget) *Limiter {
	b.Helper()
	l, err := New(Limits{Default: budget}, WithRegisterer(prometheus.NewRegistry()))
	if err != nil {
		b.Fatal(err)
	}
	b.Cleanup(func() { l.Close() })
	return l
}

// benchNoopTasks runs no-op tasks through the middleware of l, one at a
// time.
func benchNoopTasks(b *testing.B, l *Limiter) {
	h := l.Middleware()(asynq.HandlerFunc(func(context.Context, *asynq.Task) error { return nil }))
	task := asynq.NewTask("noop", []byte("payload"))
	ctx := context.Background()
	b.ReportAllocs()
	for b.Loop() {
		if err := h.ProcessTask(ctx, task); err != nil {
			b.Fatal(err)
		}
	}
}

func BenchmarkMiddleware(b *testing.B) {
	benchNoopTasks(b, benchLimiter(b, benchBudget))
}

func BenchmarkMiddlewareParallel(b *testing.B) {
	l := benchLimiter(b, benchBudget)
	h := l.Middleware()(asynq.HandlerFunc(func(context.Context, *asynq.Task) error { return nil }))
	task := asynq.NewTask("noop", []byte("payload"))
	b.ReportAllocs()
	b.RunParallel(func(pb *testing.PB) {
		ctx := context.Background()
		for pb.Next() {
			if err := h.ProcessTask(ctx, task); err != nil {
				b.Error(err)
				return
			}
		}
	})
}

// BenchmarkEndToEnd drains b.N no-op tasks through a real asynq.Server on
// the test redis-server, with and without the middleware. Run it with a
// fixed count, for example -benchtime=2000x, and compare the two with
// benchstat.
func BenchmarkEndToEnd(b *testing.B) {
	for _, tc := range []struct {
		name    string
		limited bool
	}{{"without", false}, {"with", true}} {
		b.Run(tc.name, func(b *testing.B) { benchEndToEnd(b, tc.limited) })
	}
}

func benchEndToEnd(b *testing.B, limited bool) {
	db := testRedis.NewDB()
	defer testRedis.FlushDB(db)
	redis := asynq.RedisClientOpt{Addr: testRedis.Addr, DB: db}
	client := asynq.NewClient(redis)
	defer client.Close()
	for range b.N {
		if _, err := client.Enqueue(asynq.NewTask("noop", nil), asynq.Queue("q")); err != nil {
			b.Fatal(err)
		}
	}

	done := make(chan struct{}, b.N)
	var handler asynq.Handler = asynq.HandlerFunc(func(context.Context, *asynq.Task) error {
		done <- struct{}{}
		return nil
	})
	cfg := asynq.Config{Concurrency: 8, Queues: map[string]int{"q": 1}, LogLevel: asynq.ErrorLevel}
	if limited {
		l, err := New(Limits{Queues: map[string]Budget{"q": {Concurrency: 64, Timeout: time.Minute, MaxPayload: 1024}}},
			WithRegisterer(prometheus.NewRegistry()))
		if err != nil {
			b.Fatal(err)
		}
		cfg = l.ServerConfig(cfg)
		handler = l.Middleware()(handler)
	}
	srv := asynq.NewServer(redis, cfg)

	b.ResetTimer()
	if err := srv.Start(handler); err != nil {
		b.Fatal(err)
	}
	for range b.N {
		<-done
	}
	b.StopTimer()
	srv.Shutdown()
	b.ReportMetric(float64(b.N)/b.Elapsed().Seconds(), "tasks/s")
}

// BenchmarkGoroutineHandoff is the floor under BenchmarkMiddleware on the
// same machine: starting a goroutine and waiting for its result, which the
// middleware does so that it can return at the deadline of a handler that
// ignores its context.
func BenchmarkGoroutineHandoff(b *testing.B) {
	done := make(chan error, 1)
	b.ReportAllocs()
	for b.Loop() {
		go func() { done <- nil }()
		<-done
	}
}

// BenchmarkMiddlewareCPUAccounting is BenchmarkMiddleware with a CPU
// budget, so each task locks its handler's goroutine to a thread and reads
// the thread's CPU clock at start and end. Without a Timeout or a TaskCPU
// limit, the handler runs in the middleware's goroutine; "timeout" adds both,
// and with them a goroutine per handler.
func BenchmarkMiddlewareCPUAccounting(b *testing.B) {
	budget := Budget{Concurrency: benchBudget.Concurrency, MaxPayload: benchBudget.MaxPayload, CPU: 64}
	b.Run("cpu", func(b *testing.B) { benchNoopTasks(b, benchLimiter(b, budget)) })
	budget.Timeout, budget.TaskCPU = benchBudget.Timeout, time.Hour
	b.Run("timeout", func(b *testing.B) { benchNoopTasks(b, benchLimiter(b, budget)) })
}

// benchSink keeps the compiler from discarding the work of benchmark
// handlers.
var benchSink atomic.Uint64

// BenchmarkShedReaction measures the time from the memory reading crossing
// the soft threshold to the first shed decision, in sample intervals, with
// the default grace period. Run it with -benchtime=20x.
func BenchmarkShedReaction(b *testing.B) {
	const interval = 50 * time.Millisecond
	sampler := &fakeSampler{}
	sampler.set(0, nil)
	l, err := New(Limits{
		Queues:  map[string]Budget{"low": {Priority: 0}, "high": {Priority: 1}},
		Process: ProcessLimits{MemorySoft: 100}, // the default grace: one interval
	}, WithSampler(sampler), WithSampleInterval(interval), withDetectedLimits(testDetected))
	if err != nil {
		b.Fatal(err)
	}
	defer l.Close()

	var total, worst time.Duration
	for b.Loop() {
		sampler.set(0, nil)
		for l.monitor.sheds(0, 0) {
			time.Sleep(time.Millisecond)
		}
		time.Sleep(rand.N(interval)) // cross at a random point between samples
		start := time.Now()
		sampler.set(200, nil)
		for !l.monitor.sheds(0, 0) {
			time.Sleep(time.Millisecond)
		}
		took := time.Since(start)
		total += took
		worst = max(worst, took)
	}
	b.ReportMetric(float64(total)/float64(b.N)/float64(interval), "intervals/shed")
	b.ReportMetric(float64(worst)/float64(interval), "max-intervals/shed")
}
