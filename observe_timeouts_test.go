package asynqlimit

import (
	"context"
	"errors"
	"testing"
	"time"

	"github.com/hibiken/asynq"
	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/testutil"
)

// A task over both its TaskCPU and the queue's Timeout counts once in
// timeouts_total, in observe mode as in enforce mode, which ends the task at
// its Timeout.
func TestObserveCountsOneTimeoutPerTask(t *testing.T) {
	skipWithoutThreadCPU(t)
	for _, mode := range []Mode{Enforce, Observe} {
		t.Run(mode.String(), func(t *testing.T) {
			l, err := New(Limits{
				Default: Budget{Timeout: 20 * time.Millisecond, TaskCPU: 10 * time.Millisecond},
				Mode:    mode,
			}, WithRegisterer(prometheus.NewRegistry()), WithSampleInterval(time.Hour))
			if err != nil {
				t.Fatal(err)
			}
			defer l.Close()
			h := l.Middleware()(asynq.HandlerFunc(func(ctx context.Context, _ *asynq.Task) error {
				return spin(ctx, 50*time.Millisecond)
			}))

			_ = h.ProcessTask(context.Background(), asynq.NewTask("spin", nil))
			if got := testutil.ToFloat64(l.queue("").metrics.timeouts); got != 1 {
				t.Errorf("timeouts_total after one task over its Timeout and its TaskCPU = %v, want 1", got)
			}
		})
	}
}

func TestAbandonedTaskOverTaskCPUCountsOnce(t *testing.T) {
	skipWithoutThreadCPU(t)
	l, err := New(Limits{Default: Budget{Timeout: 50 * time.Millisecond, TaskCPU: 100 * time.Millisecond}},
		WithRegisterer(prometheus.NewRegistry()), WithSampleInterval(20*time.Millisecond), WithAbandonGrace(10*time.Millisecond))
	if err != nil {
		t.Fatal(err)
	}
	defer l.Close()
	finished := make(chan struct{})
	h := l.Middleware()(asynq.HandlerFunc(func(context.Context, *asynq.Task) error {
		defer close(finished)
		return spin(context.Background(), 400*time.Millisecond) // ignores its context
	}))

	if err := h.ProcessTask(context.Background(), asynq.NewTask("spin", nil)); !errors.Is(err, ErrTimedOut) {
		t.Fatalf("ProcessTask() error = %v, want ErrTimedOut", err)
	}
	<-finished // the samples saw it over its TaskCPU meanwhile
	if got := testutil.ToFloat64(l.queue("").metrics.timeouts); got != 1 {
		t.Errorf("timeouts_total for one task past its Timeout and then its TaskCPU = %v, want 1", got)
	}
}
