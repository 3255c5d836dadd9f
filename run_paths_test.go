package asynqlimit

import (
	"context"
	"errors"
	"log/slog"
	"math/rand/v2"
	"runtime"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/hibiken/asynq"
	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/testutil"
)

// runPaths are two budgets: the first runs handlers in a goroutine of
// their own, the second inline. The tests expect the same behaviour from both.
var runPaths = []struct {
	name   string
	budget Budget
	inline bool
}{
	{name: "own goroutine", budget: Budget{Concurrency: 1}, inline: false},
	{name: "inline", budget: Budget{CPU: 4, Concurrency: 1}, inline: true},
}

func runPathLimiter(t *testing.T, b Budget, opts ...Option) (*Limiter, *syncBuffer) {
	t.Helper()
	logs := &syncBuffer{}
	opts = append([]Option{WithRegisterer(prometheus.NewRegistry()), WithSampleInterval(time.Hour),
		WithLogger(slog.New(slog.NewTextHandler(logs, nil)))}, opts...)
	l, err := New(Limits{Default: b}, opts...)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { l.Close() })
	return l, logs
}

// heldTask is a task whose handler ignores its context and returns when
// release is closed.
type heldTask struct {
	cancel  context.CancelFunc // ends the task's context
	release chan struct{}
	result  chan error // receives what the middleware returned
}

// startHeldTask runs a heldTask through the middleware of l in a new
// goroutine and returns once its handler runs.
func startHeldTask(l *Limiter) heldTask {
	started := make(chan struct{})
	task := heldTask{release: make(chan struct{}), result: make(chan error, 1)}
	h := l.Middleware()(asynq.HandlerFunc(func(context.Context, *asynq.Task) error {
		close(started)
		<-task.release
		return nil
	}))
	ctx, cancel := context.WithCancel(context.Background())
	task.cancel = cancel
	go func() { task.result <- h.ProcessTask(ctx, asynq.NewTask("held", nil)) }()
	<-started
	return task
}

func outcomeSum(q *queueState) float64 {
	sum := 0.0
	for _, c := range q.metrics.outcomes {
		sum += testutil.ToFloat64(c)
	}
	return sum
}

// TestRunPathsGoexitCountsOutcome checks that a handler calling
// runtime.Goexit counts as failed. Inline, the goroutine ends before
// runInline gets to report, so execute counts it.
func TestRunPathsGoexitCountsOutcome(t *testing.T) {
	skipWithoutThreadCPU(t)
	for _, p := range runPaths {
		t.Run(p.name, func(t *testing.T) {
			l, _ := runPathLimiter(t, p.budget)
			h := l.Middleware()(asynq.HandlerFunc(func(context.Context, *asynq.Task) error {
				runtime.Goexit()
				return nil
			}))
			exited := make(chan struct{})
			go func() {
				defer close(exited)
				_ = h.ProcessTask(context.Background(), asynq.NewTask("exit", nil))
			}()
			<-exited
			q := l.queue("")
			if got := q.inFlight.Load(); got != 0 {
				t.Errorf("in flight = %d, expected 0", got)
			}
			if got := outcomeSum(q); got != 1 {
				t.Errorf("tasks_total over all outcomes = %v after a handler called runtime.Goexit, expected 1 (failed)", got)
			}
		})
	}
}

// TestRunPathsContextEndsWhenTaskEnds checks that the handler's context
// ends when the task ends, so an AfterFunc on it runs, on both paths.
func TestRunPathsContextEndsWhenTaskEnds(t *testing.T) {
	skipWithoutThreadCPU(t)
	for _, p := range runPaths {
		t.Run(p.name, func(t *testing.T) {
			l, _ := runPathLimiter(t, p.budget)
			parent, cancelParent := context.WithCancel(context.Background())
			defer cancelParent()
			fired := make(chan struct{})
			var taskCtx context.Context
			h := l.Middleware()(asynq.HandlerFunc(func(ctx context.Context, _ *asynq.Task) error {
				taskCtx = ctx
				context.AfterFunc(ctx, func() { close(fired) })
				return nil
			}))
			if err := h.ProcessTask(parent, asynq.NewTask("leave", nil)); err != nil {
				t.Fatal(err)
			}
			if taskCtx.Err() == nil {
				t.Errorf("the handler's context has no error after the middleware returned, expected context.Canceled because end cancels it")
			}
			select {
			case <-fired:
			case <-time.After(500 * time.Millisecond):
				t.Errorf("an AfterFunc on the handler's context did not run after the task ended")
			}
		})
	}
}

// TestRunPathsAbandonedAfterClose ends a handler's context right before
// Close, as Server.Shutdown does. Inline, the CPU samples that notice
// abandonment have stopped, so Close checks the runs itself.
func TestRunPathsAbandonedAfterClose(t *testing.T) {
	skipWithoutThreadCPU(t)
	for _, p := range runPaths {
		t.Run(p.name, func(t *testing.T) {
			l, logs := runPathLimiter(t, p.budget, WithSampleInterval(10*time.Millisecond), WithAbandonGrace(20*time.Millisecond))
			task := startHeldTask(l)
			task.cancel()
			l.Close()
			time.Sleep(150 * time.Millisecond)
			q := l.queue("")
			got := testutil.ToFloat64(q.metrics.abandoned)
			logged := strings.Contains(logs.String(), "handler ignores its context")
			close(task.release)
			<-task.result
			if got != 1 {
				t.Errorf("abandoned = %v for a handler that ignored its context for 7 grace periods, expected 1", got)
			}
			if !logged {
				t.Errorf("the abandoned handler was not logged; logs:\n%s", logs)
			}
			if n := outcomeSum(q); n != 1 {
				t.Errorf("tasks_total over all outcomes = %v, expected 1", n)
			}
		})
	}
}

// TestRunPathsAbandonedPanic checks an abandoned inline handler that panics. The middleware
// returns the abandonment error because asynq no longer waits, and releases the budget.
func TestRunPathsAbandonedPanic(t *testing.T) {
	skipWithoutThreadCPU(t)
	l, _ := runPathLimiter(t, Budget{CPU: 4, Concurrency: 1}, WithAbandonGrace(0))
	release, started := make(chan struct{}), make(chan struct{})
	h := l.Middleware()(asynq.HandlerFunc(func(context.Context, *asynq.Task) error {
		close(started)
		<-release
		panic("late")
	}))
	ctx, cancel := context.WithCancel(context.Background())
	result := make(chan error, 1)
	go func() {
		defer func() {
			if v := recover(); v != nil {
				result <- errors.New("panic reached the caller")
			}
		}()
		result <- h.ProcessTask(ctx, asynq.NewTask("late", nil))
	}()
	<-started

	cancel()
	l.sampleCPU()
	q := l.queue("")
	if got := testutil.ToFloat64(q.metrics.abandoned); got != 1 {
		t.Fatalf("abandoned = %v, expected 1", got)
	}

	close(release)
	err := <-result
	if !errors.Is(err, context.Canceled) {
		t.Errorf("middleware returned %v, expected the abandonment error", err)
	}
	if got := testutil.ToFloat64(q.metrics.abandoned); got != 0 {
		t.Errorf("abandoned = %v after return, expected 0", got)
	}
	if got := outcomeSum(q); got != 1 {
		t.Errorf("outcomes = %v, expected 1", got)
	}
	if !q.tryAcquire() {
		t.Error("the queue's slot is still held after the handler returned")
	}
}

// TestRunPathsSamplerRace runs inline tasks, half with an ended context, against a
// sampler in a loop. Run it with -race: each task must be counted once and release its budget.
func TestRunPathsSamplerRace(t *testing.T) {
	skipWithoutThreadCPU(t)
	l, _ := runPathLimiter(t, Budget{CPU: 64}, WithAbandonGrace(time.Millisecond))
	stop := make(chan struct{})
	var sampler sync.WaitGroup
	sampler.Add(1)
	go func() {
		defer sampler.Done()
		for {
			select {
			case <-stop:
				return
			default:
				l.sampleCPU()
			}
		}
	}()

	h := l.Middleware()(asynq.HandlerFunc(func(ctx context.Context, _ *asynq.Task) error {
		if ctx.Value(activeLimiterKey{}) != l {
			return errors.New("missing the active Limiter in the handler's context")
		}
		time.Sleep(time.Duration(rand.IntN(3)) * time.Millisecond) // ignores its context
		return ctx.Err()
	}))

	const n = 400
	var abandonedErrs, wrong atomic.Int64
	var wg sync.WaitGroup
	for i := range n {
		wg.Add(1)
		go func() {
			defer wg.Done()
			ctx, cancel := context.WithCancel(context.Background())
			if i%2 == 0 {
				cancel()
			}
			err := h.ProcessTask(ctx, asynq.NewTask("t", nil))
			cancel()
			switch {
			case err != nil && strings.Contains(err.Error(), "still running"): // abandoned by a sample
				abandonedErrs.Add(1)
			case err != nil && !errors.Is(err, context.Canceled):
				wrong.Add(1)
			}
		}()
	}
	wg.Wait()
	close(stop)
	sampler.Wait()

	q := l.queue("")
	if got := outcomeSum(q); got != n {
		t.Errorf("outcomes = %v, expected %d", got, n)
	}
	if got := testutil.ToFloat64(q.metrics.abandoned); got != 0 {
		t.Errorf("abandoned = %v, expected 0", got)
	}
	if got := q.inFlight.Load(); got != 0 {
		t.Errorf("in flight = %d, expected 0", got)
	}
	if got := l.running.Load(); got != 0 {
		t.Errorf("running = %d, expected 0", got)
	}
	if got := testutil.ToFloat64(q.metrics.inFlight); got != 0 {
		t.Errorf("tasks_in_flight = %v, expected 0", got)
	}
	if wrong.Load() != 0 {
		t.Errorf("%d tasks returned an unexpected error", wrong.Load())
	}
	q.runsMu.Lock()
	left := len(q.runs)
	q.runsMu.Unlock()
	if left != 0 {
		t.Errorf("%d runs still tracked", left)
	}
	t.Logf("%d of %d tasks abandoned by the samples", abandonedErrs.Load(), n)
}

// TestRunPathsNestedSameLimiter applies the Limiter twice, as NewServer plus mux.Use
// does. The handler must run once, under one slot.
func TestRunPathsNestedSameLimiter(t *testing.T) {
	skipWithoutThreadCPU(t)
	l, _ := runPathLimiter(t, Budget{CPU: 4, Concurrency: 1})
	calls := 0
	var inFlight int64
	mux := asynq.NewServeMux()
	mux.Use(l.Middleware())
	mux.HandleFunc("t", func(ctx context.Context, _ *asynq.Task) error {
		calls++
		inFlight = l.queue("").inFlight.Load()
		return nil
	})
	h := l.Middleware()(mux)
	if err := h.ProcessTask(context.Background(), asynq.NewTask("t", nil)); err != nil {
		t.Fatal(err)
	}
	q := l.queue("")
	if calls != 1 {
		t.Errorf("handler calls = %d, expected 1", calls)
	}
	if inFlight != 1 {
		t.Errorf("in flight during the call = %d, expected 1", inFlight)
	}
	if got := outcomeSum(q); got != 1 {
		t.Errorf("outcomes = %v, expected 1", got)
	}
}

// TestRunPathsObserveTimeout runs an inline observe-mode task over its Timeout and TaskCPU.
// It must count one timeout and succeed, with a context that never ends.
func TestRunPathsObserveTimeout(t *testing.T) {
	skipWithoutThreadCPU(t)
	logs := &syncBuffer{}
	l, err := New(Limits{Mode: Observe, Default: Budget{CPU: 4, Timeout: 10 * time.Millisecond, TaskCPU: time.Millisecond}},
		WithRegisterer(prometheus.NewRegistry()), WithSampleInterval(time.Hour), WithLogger(slog.New(slog.NewTextHandler(logs, nil))))
	if err != nil {
		t.Fatal(err)
	}
	defer l.Close()

	var hasDeadline bool
	var ctxErr error
	h := l.Middleware()(asynq.HandlerFunc(func(ctx context.Context, _ *asynq.Task) error {
		_, hasDeadline = ctx.Deadline()
		err := spin(ctx, 30*time.Millisecond)
		ctxErr = ctx.Err()
		return err
	}))
	if err := h.ProcessTask(context.Background(), asynq.NewTask("slow", nil)); err != nil {
		t.Fatal(err)
	}

	q := l.queue("")
	if hasDeadline {
		t.Error("the handler's context has a deadline, expected none in observe mode")
	}
	if ctxErr != nil {
		t.Errorf("the handler's context ended with %v, expected observe mode to leave it running", ctxErr)
	}
	if got := testutil.ToFloat64(q.metrics.timeouts); got != 1 {
		t.Errorf("timeouts_total = %v, expected 1", got)
	}
	if got := testutil.ToFloat64(q.metrics.outcomes[OutcomeSucceeded]); got != 1 {
		t.Errorf("succeeded = %v, expected 1", got)
	}
}

// TestRunPathsAbandonedUnderAsynq runs an inline handler that ignores asynq's deadline on a
// real server. A CPU sample must count it as abandoned, and the next task must wait for its slot.
func TestRunPathsAbandonedUnderAsynq(t *testing.T) {
	skipWithoutThreadCPU(t)
	h := newHarness(t, Limits{Queues: map[string]Budget{"q": fastDefer(Budget{CPU: 8, Concurrency: 1})}},
		asynq.Config{Concurrency: 4, Queues: map[string]int{"q": 1}},
		WithAbandonGrace(50*time.Millisecond), WithSampleInterval(20*time.Millisecond))
	stubborn := h.enqueue("q", "ignore", nil, asynq.MaxRetry(0), asynq.Timeout(time.Second))

	var mu sync.Mutex
	var stubbornEnd, quickStart time.Time
	var stubbornStack string
	stubbornStarted := make(chan struct{})
	mux := asynq.NewServeMux()
	mux.HandleFunc("ignore", func(context.Context, *asynq.Task) error {
		buf := make([]byte, 16<<10)
		mu.Lock()
		stubbornStack = string(buf[:runtime.Stack(buf, false)])
		mu.Unlock()
		close(stubbornStarted)
		time.Sleep(2 * time.Second) // ignores its context
		mu.Lock()
		stubbornEnd = time.Now()
		mu.Unlock()
		return nil
	})
	mux.HandleFunc("quick", func(context.Context, *asynq.Task) error {
		mu.Lock()
		quickStart = time.Now()
		mu.Unlock()
		return nil
	})
	h.start(mux)
	<-stubbornStarted
	quick := h.enqueue("q", "quick", nil, asynq.MaxRetry(3))

	abandoned := h.srv.limiter.metrics.abandoned.WithLabelValues("q")
	waitFor(t, 5*time.Second, func() bool { return testutil.ToFloat64(abandoned) == 1 },
		func() string { return "abandoned_tasks never reached 1" })
	waitFor(t, 10*time.Second, func() bool { return h.taskInfo("q", quick.ID).State == asynq.TaskStateCompleted },
		func() string { return "quick task never completed" })
	mu.Lock()
	if !strings.Contains(stubbornStack, "(*processor).perform") {
		t.Errorf("the handler did not run in asynq's goroutine; its stack:\n%s", stubbornStack)
	}
	if quickStart.Before(stubbornEnd) {
		t.Errorf("quick task started %s before the abandoned handler returned", stubbornEnd.Sub(quickStart))
	}
	mu.Unlock()
	if got := testutil.ToFloat64(abandoned); got != 0 {
		t.Errorf("abandoned_tasks after the handler returned = %v, expected 0", got)
	}
	if got := h.outcome("q", OutcomeTimedOut); got != 1 {
		t.Errorf("tasks_total{timed_out} = %v, expected 1", got)
	}
	if got := h.outcome("q", OutcomeSucceeded); got != 1 {
		t.Errorf("tasks_total{succeeded} = %v, expected 1", got)
	}
	if n := strings.Count(h.logs.String(), "ignores its context"); n != 1 {
		t.Errorf("abandonment logged %d times, expected once", n)
	}
	if got := h.taskInfo("q", stubborn.ID).State; got != asynq.TaskStateArchived {
		t.Errorf("stubborn task state %v, expected archived", got)
	}
}

// TestRunPathsLateSuccessTimesOut runs a handler that ignores its context
// and returns nil shortly after the caller's deadline, within the grace
// period. asynq fails such a task with context.DeadlineExceeded, so it must
// count as timed out on both paths, not as succeeded.
func TestRunPathsLateSuccessTimesOut(t *testing.T) {
	skipWithoutThreadCPU(t)
	for _, p := range runPaths {
		t.Run(p.name, func(t *testing.T) {
			l, logs := runPathLimiter(t, p.budget, WithAbandonGrace(time.Second))
			h := l.Middleware()(asynq.HandlerFunc(func(context.Context, *asynq.Task) error {
				time.Sleep(60 * time.Millisecond) // ignores its context
				return nil
			}))
			ctx, cancel := context.WithTimeout(context.Background(), 20*time.Millisecond)
			defer cancel()

			if err := h.ProcessTask(ctx, asynq.NewTask("late", nil)); err != nil {
				t.Errorf("ProcessTask = %v, expected the handler's nil", err)
			}
			q := l.queue("")
			if got := testutil.ToFloat64(q.metrics.outcomes[OutcomeTimedOut]); got != 1 {
				t.Errorf("timed_out = %v, expected 1", got)
			}
			if got := testutil.ToFloat64(q.metrics.outcomes[OutcomeSucceeded]); got != 0 {
				t.Errorf("succeeded = %v, expected 0", got)
			}
			if !strings.Contains(logs.String(), "task timed out") || !strings.Contains(logs.String(), "timeout=20ms") {
				t.Errorf("no timed-out log line with the caller's 20ms deadline; logs:\n%s", logs)
			}
		})
	}
}
