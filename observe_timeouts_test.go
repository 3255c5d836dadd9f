package asynqlimit

import (
	"context"
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
