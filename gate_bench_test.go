package asynqlimit

import (
	"bufio"
	"context"
	"strconv"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	"github.com/hibiken/asynq"
	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/testutil"
	"github.com/redis/go-redis/v9"
)

// BenchmarkGateHook measures the cost that the gate's hook adds to one
// Redis command, without the network: next returns at once.
func BenchmarkGateHook(b *testing.B) {
	l, err := New(Limits{Queues: map[string]Budget{"open": {Concurrency: 1 << 20}, "full": {Concurrency: 1}}},
		WithRegisterer(prometheus.NewRegistry()))
	if err != nil {
		b.Fatal(err)
	}
	defer l.Close()
	client := redis.NewClient(&redis.Options{Addr: testRedis.Addr})
	defer client.Close()
	l.InstrumentRedis(client) // connects to nothing until a command is sent
	l.gate.state.Store(gateConfirmed)
	l.named["full"].tryAcquire()

	ctx := context.Background()
	const sha = "0123456789abcdef0123456789abcdef01234567"
	// An empty queue's script returns nil, which go-redis reports as
	// redis.Nil; next does the same, so that no task enters transit.
	emptyQueue := func(context.Context, redis.Cmder) error { return redis.Nil }
	for _, bc := range []struct {
		name string
		cmd  redis.Cmder
	}{
		{"other command", redis.NewStringCmd(ctx, "get", "asynq:{open}:pending")},
		{"other script", redis.NewCmd(ctx, "evalsha", sha, 2, "asynq:{open}:active", "asynq:{open}:lease", "id")},
		{"dequeue open", redis.NewCmd(ctx, dequeueArgs("evalsha", sha, "open")...)},
		{"dequeue closed", redis.NewCmd(ctx, dequeueArgs("evalsha", sha, "full")...)},
	} {
		b.Run(bc.name, func(b *testing.B) {
			hook := gateHook{g: l.gate}.ProcessHook(emptyQueue)
			b.ReportAllocs()
			for b.Loop() {
				_ = hook(ctx, bc.cmd)
			}
		})
	}
}

// BenchmarkGateSaturatedQueue runs a backlog of slow tasks on a queue with a
// concurrency budget of 1, beside a queue of no-op tasks, through NewServer
// on the test redis-server, with and without the gate. It reports the Redis
// commands per completed task, from INFO commandstats (which also counts
// the commands that scripts call), the scripts per completed task, and the
// deferrals per completed task of the saturated queue. Run it alone, with
// -benchtime=1x, because the counts are the whole server's.
func BenchmarkGateSaturatedQueue(b *testing.B) {
	if !testRedis.Real {
		b.Skip("needs redis-server for INFO commandstats")
	}
	for _, bc := range []struct {
		name string
		opts []Option
	}{{"with gate", nil}, {"without gate", []Option{WithoutGate()}}} {
		b.Run(bc.name, func(b *testing.B) {
			for range b.N {
				benchSaturatedQueue(b, bc.opts...)
			}
		})
	}
}

func benchSaturatedQueue(b *testing.B, opts ...Option) {
	const slowTasks, fastTasks = 20, 200
	const slowFor = 50 * time.Millisecond
	ctx := context.Background()
	db := testRedis.NewDB()
	defer testRedis.FlushDB(db)
	redisOpt := asynq.RedisClientOpt{Addr: testRedis.Addr, DB: db}
	admin := redis.NewClient(&redis.Options{Addr: testRedis.Addr, DB: db})
	defer admin.Close()

	producer := asynq.NewClient(redisOpt)
	defer producer.Close()
	for range slowTasks {
		if _, err := producer.Enqueue(asynq.NewTask("slow", nil), asynq.Queue("slow")); err != nil {
			b.Fatal(err)
		}
	}
	for range fastTasks {
		if _, err := producer.Enqueue(asynq.NewTask("fast", nil), asynq.Queue("fast")); err != nil {
			b.Fatal(err)
		}
	}

	limits := Limits{Queues: map[string]Budget{
		"slow": {Concurrency: 1, DeferDelay: 100 * time.Millisecond, MaxDeferDelay: time.Second},
		"fast": {},
	}}
	reg := prometheus.NewRegistry()
	opts = append([]Option{WithRegisterer(reg)}, opts...)
	srv, err := NewServer(redisOpt, asynq.Config{
		Concurrency:              8,
		Queues:                   map[string]int{"slow": 1, "fast": 1},
		TaskCheckInterval:        100 * time.Millisecond,
		DelayedTaskCheckInterval: 500 * time.Millisecond,
		LogLevel:                 asynq.ErrorLevel,
	}, limits, opts...)
	if err != nil {
		b.Fatal(err)
	}

	var completed atomic.Int64
	done := make(chan struct{})
	mux := asynq.NewServeMux()
	finish := func() {
		if completed.Add(1) == slowTasks+fastTasks {
			close(done)
		}
	}
	mux.HandleFunc("slow", func(context.Context, *asynq.Task) error {
		time.Sleep(slowFor)
		finish()
		return nil
	})
	mux.HandleFunc("fast", func(context.Context, *asynq.Task) error {
		finish()
		return nil
	})

	if err := admin.ConfigResetStat(ctx).Err(); err != nil {
		b.Fatal(err)
	}
	start := time.Now()
	if err := srv.Start(mux); err != nil {
		b.Fatal(err)
	}
	select {
	case <-done:
	case <-time.After(2 * time.Minute):
		b.Fatalf("only %d of %d tasks completed within 2 minutes", completed.Load(), slowTasks+fastTasks)
	}
	elapsed := time.Since(start)
	time.Sleep(100 * time.Millisecond) // asynq marks the last task completed after its handler returns
	stats, err := admin.Info(ctx, "commandstats").Result()
	if err != nil {
		b.Fatal(err)
	}
	srv.Shutdown()

	calls := commandCalls(stats)
	total := 0
	for _, n := range calls {
		total += n
	}
	deferrals := testutil.ToFloat64(srv.Limiter().metrics.deferrals.WithLabelValues("slow", string(ReasonConcurrency)))
	tasks := float64(slowTasks + fastTasks)
	b.ReportMetric(float64(total)/tasks, "redis-cmds/task")
	b.ReportMetric(float64(calls["evalsha"]+calls["eval"])/tasks, "scripts/task")
	b.ReportMetric(deferrals/slowTasks, "deferrals/slow-task")
	b.ReportMetric(elapsed.Seconds(), "s/run")
}

// commandCalls returns the calls of each command in the output of INFO
// commandstats, whose lines read "cmdstat_get:calls=2,usec=...".
func commandCalls(info string) map[string]int {
	calls := map[string]int{}
	scanner := bufio.NewScanner(strings.NewReader(info))
	for scanner.Scan() {
		line, ok := strings.CutPrefix(scanner.Text(), "cmdstat_")
		if !ok {
			continue
		}
		name, fields, ok := strings.Cut(line, ":")
		if !ok {
			continue
		}
		for field := range strings.SplitSeq(fields, ",") {
			if value, ok := strings.CutPrefix(field, "calls="); ok {
				n, _ := strconv.Atoi(value)
				calls[name] = n
			}
		}
	}
	return calls
}
