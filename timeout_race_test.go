package asynqlimit

import (
	"context"
	"testing"
	"time"

	"github.com/hibiken/asynq"
	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/testutil"
)

// A task that reaches its Timeout and its TaskCPU together counts once in
// timeouts_total. A sample can see the task over its TaskCPU after the timer
// fired but before await ended the task's context, and await, with the timer
// and the stop signal both ready, picks either.
//
// The test calls enter, sampleCPU, await and end itself. A busy scheduler can
// run them in this order, because the middleware's goroutine may wake late.
func TestTimeoutWithTaskCPUCountsOnce(t *testing.T) {
	skipWithoutThreadCPU(t)
	l, err := New(Limits{Default: Budget{Timeout: 20 * time.Millisecond, TaskCPU: 5 * time.Millisecond}},
		WithRegisterer(prometheus.NewRegistry()), WithSampleInterval(time.Hour), WithAbandonGrace(time.Millisecond))
	if err != nil {
		t.Fatal(err)
	}
	defer l.Close()
	next := asynq.HandlerFunc(func(context.Context, *asynq.Task) error {
		return spin(context.Background(), 80*time.Millisecond) // ignores its context
	})
	queue := l.queue("")

	const runs = 12
	for i := range runs {
		before := testutil.ToFloat64(queue.metrics.timeouts)
		ctx := context.Background()
		run, err := l.enter(ctx, asynq.NewTask("spin", nil), next)
		if err != nil {
			t.Fatal(err)
		}
		time.Sleep(40 * time.Millisecond) // past the Timeout, so its timer has fired
		l.sampleCPU()                     // reads the task over its TaskCPU
		_ = l.end(run, l.await(run, ctx))
		if err := l.Drain(context.Background()); err != nil {
			t.Fatal(err)
		}

		if got := testutil.ToFloat64(queue.metrics.timeouts) - before; got != 1 {
			t.Fatalf("run %d: timeouts_total grew by %v for one task over its Timeout and TaskCPU, expected 1", i, got)
		}
	}
}
