package asynqlimit

import (
	"context"
	"errors"
	"testing"
	"time"

	"github.com/hibiken/asynq"
	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/testutil"
	"go.uber.org/goleak"
)

// blockingHandler returns a handler that signals started and then blocks
// until release is closed, ignoring its context.
func blockingHandler(started chan<- struct{}, release <-chan struct{}) asynq.Handler {
	return asynq.HandlerFunc(func(context.Context, *asynq.Task) error {
		started <- struct{}{}
		<-release
		return nil
	})
}

func TestDrainWaitsForAbandoned(t *testing.T) {
	l, err := New(Limits{Default: Budget{Timeout: 50 * time.Millisecond}}, WithAbandonGrace(10*time.Millisecond))
	if err != nil {
		t.Fatal(err)
	}
	started, release := make(chan struct{}, 1), make(chan struct{})
	h := l.Middleware()(blockingHandler(started, release))
	if err := h.ProcessTask(context.Background(), asynq.NewTask("t", nil)); !errors.Is(err, ErrTimedOut) {
		t.Fatalf("ProcessTask = %v, want ErrTimedOut", err)
	}
	<-started

	short, cancel := context.WithTimeout(context.Background(), 50*time.Millisecond)
	defer cancel()
	if err := l.Drain(short); !errors.Is(err, context.DeadlineExceeded) {
		t.Errorf("Drain with an abandoned handler running = %v, want DeadlineExceeded", err)
	}
	close(release)
	long, cancelLong := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancelLong()
	if err := l.Drain(long); err != nil {
		t.Errorf("Drain after the handler returned = %v, want nil", err)
	}
}

func TestWaitCanceledIsNotAFailure(t *testing.T) {
	l, err := New(Limits{Default: Budget{Concurrency: 1}})
	if err != nil {
		t.Fatal(err)
	}
	started, release := make(chan struct{}, 1), make(chan struct{})
	h := l.Middleware()(blockingHandler(started, release))
	done := make(chan error, 1)
	go func() { done <- h.ProcessTask(context.Background(), asynq.NewTask("t", nil)) }()
	<-started

	// A context without asynq's metadata counts as a last attempt, so the
	// second task waits for the slot.
	ctx, cancel := context.WithCancel(context.Background())
	time.AfterFunc(50*time.Millisecond, cancel)
	if err := h.ProcessTask(ctx, asynq.NewTask("t", nil)); !errors.Is(err, context.Canceled) {
		t.Errorf("ProcessTask while waiting = %v, want context.Canceled", err)
	}
	q := l.queue("")
	for _, o := range []Outcome{OutcomeFailed, OutcomeTimedOut} {
		if got := testutil.ToFloat64(q.metrics.outcomes[o]); got != 0 {
			t.Errorf("tasks_total{%s} = %v, want 0 for a canceled wait", o, got)
		}
	}
	close(release)
	if err := <-done; err != nil {
		t.Errorf("first task = %v, want nil", err)
	}
}

func TestObserveCountsLastAttemptAsWait(t *testing.T) {
	l, err := New(Limits{Default: Budget{Concurrency: 1}, Mode: Observe})
	if err != nil {
		t.Fatal(err)
	}
	started, release := make(chan struct{}, 2), make(chan struct{})
	h := l.Middleware()(blockingHandler(started, release))
	done := make(chan error, 2)
	for range 2 {
		go func() { done <- h.ProcessTask(context.Background(), asynq.NewTask("t", nil)) }()
	}
	<-started
	<-started // observe mode runs the second task over the cap
	close(release)
	for range 2 {
		if err := <-done; err != nil {
			t.Errorf("ProcessTask = %v, want nil", err)
		}
	}
	q := l.queue("")
	if got := testutil.ToFloat64(q.metrics.waits); got != 1 {
		t.Errorf("waits_total = %v, want 1", got)
	}
	if got := testutil.ToFloat64(q.metrics.deferrals[ReasonConcurrency]); got != 0 {
		t.Errorf("deferrals_total = %v, want 0 for a last attempt", got)
	}
}

func TestNewServerErrorClosesInspector(t *testing.T) {
	before := goleak.IgnoreCurrent()
	reg := prometheus.NewRegistry()
	redis := asynq.RedisClientOpt{Addr: testRedis.Addr, DB: testRedis.NewDB()}
	first, err := NewServer(redis, asynq.Config{LogLevel: asynq.ErrorLevel}, Limits{}, WithRegisterer(reg))
	if err != nil {
		t.Fatal(err)
	}
	// asynq closes a server's Redis client only on the Shutdown of a started
	// server.
	if err := first.Start(asynq.HandlerFunc(func(context.Context, *asynq.Task) error { return nil })); err != nil {
		t.Fatal(err)
	}
	if _, err := NewServer(redis, asynq.Config{}, Limits{}, WithRegisterer(reg)); err == nil {
		t.Fatal("second NewServer on the same registry succeeded, want a registration error")
	}
	first.Shutdown()
	goleak.VerifyNone(t, before)
}
