//go:build unix

package asynqlimit

import (
	"context"
	"fmt"
	"hash/fnv"
	"syscall"
	"testing"
	"time"

	"github.com/hibiken/asynq"
)

// BenchmarkMiddlewareOverhead runs a handler that hashes a 2 KiB payload,
// a few microseconds of work, called directly, through the middleware, and
// through the middleware with CPU accounting. The overhead of the
// middleware is the difference from "direct". "cpu-accounting" has a CPU
// budget alone, so the handler runs in the middleware's goroutine.
// "cpu-accounting-timeout" adds a Timeout and a TaskCPU limit, so the
// handler runs in a goroutine of its own.
//
// In "same" the benchmark's goroutine calls the handler, as the other
// middleware benchmarks do. In "fresh" each task gets a new goroutine and
// the benchmark waits for its result, as asynq's processor does. A new
// goroutine starts with a small stack, so a middleware with deep frames
// makes the runtime grow and copy that stack for every task, which "same"
// cannot show. The "cpu-ns/op" metric is the process's CPU time per task,
// on every processor, including the runtime's threads that look for work.
func BenchmarkMiddlewareOverhead(b *testing.B) {
	work := asynq.HandlerFunc(func(_ context.Context, t *asynq.Task) error {
		h := fnv.New64a()
		h.Write(t.Payload())
		benchSink.Store(h.Sum64())
		return nil
	})
	budget := benchBudget
	budget.MaxPayload = 1 << 20
	cpuBudget := Budget{Concurrency: budget.Concurrency, MaxPayload: budget.MaxPayload, CPU: 64}
	cpuTimeoutBudget := budget
	cpuTimeoutBudget.CPU, cpuTimeoutBudget.TaskCPU = 64, time.Hour
	handlers := []struct {
		name    string
		handler asynq.Handler
	}{
		{"direct", work},
		{"middleware", benchLimiter(b, budget).Middleware()(work)},
		{"cpu-accounting", benchLimiter(b, cpuBudget).Middleware()(work)},
		{"cpu-accounting-timeout", benchLimiter(b, cpuTimeoutBudget).Middleware()(work)},
	}
	for _, caller := range []struct {
		name string
		run  func(asynq.Handler, *asynq.Task) error
	}{
		{"same", func(h asynq.Handler, t *asynq.Task) error { return h.ProcessTask(context.Background(), t) }},
		{"fresh", runInFreshGoroutine},
	} {
		for _, size := range []int{2 << 10, 4 << 10} {
			task := asynq.NewTask("work", make([]byte, size))
			for _, tc := range handlers {
				b.Run(fmt.Sprintf("%s/%dKiB/%s", caller.name, size>>10, tc.name), func(b *testing.B) {
					b.ReportAllocs()
					before := processCPU(b)
					for b.Loop() {
						if err := caller.run(tc.handler, task); err != nil {
							b.Fatal(err)
						}
					}
					b.ReportMetric(float64((processCPU(b)-before).Nanoseconds())/float64(b.N), "cpu-ns/op")
				})
			}
		}
	}
}

// runInFreshGoroutine calls h in a new goroutine and returns its result.
func runInFreshGoroutine(h asynq.Handler, t *asynq.Task) error {
	res := make(chan error, 1)
	go func() { res <- h.ProcessTask(context.Background(), t) }()
	return <-res
}

// processCPU returns the CPU time that the process has used so far.
func processCPU(b *testing.B) time.Duration {
	var ru syscall.Rusage
	if err := syscall.Getrusage(syscall.RUSAGE_SELF, &ru); err != nil {
		b.Fatal(err)
	}
	return time.Duration(ru.Utime.Nano() + ru.Stime.Nano())
}
