package asynqlimit

import (
	"context"
	"errors"
	"runtime"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/hibiken/asynq"
	"github.com/prometheus/client_golang/prometheus/testutil"
	"go.uber.org/goleak"
)

// newFollowingCtx returns a runCtx that follows parent, as start sets it up
// for an inline run.
func newFollowingCtx(parent context.Context) *runCtx {
	ctx := newRunCtx(parent, &Limiter{}, time.Time{}, false)
	ctx.followsParent = true
	return ctx
}

// isClosed reports whether done is closed, without waiting.
func isClosed(done <-chan struct{}) bool {
	select {
	case <-done:
		return true
	default:
		return false
	}
}

// TestRunCtxFollowErrImpliesDone ends the parent and the run while readers
// call Err, Done and AfterFunc in different orders. A non-nil Err needs a closed Done.
func TestRunCtxFollowErrImpliesDone(t *testing.T) {
	before := goleak.IgnoreCurrent()
	var broken atomic.Int64
	for i := range 2000 {
		parent, cancelParent := context.WithCancel(context.Background())
		ctx := newFollowingCtx(parent)
		checkDoneClosed := func() {
			if ctx.Err() != nil && !isClosed(ctx.Done()) {
				broken.Add(1)
			}
		}
		readers := []func(){
			func() {
				// Polls Err only, without calling Done first.
				for ctx.Err() == nil {
					runtime.Gosched()
				}
				checkDoneClosed()
			},
			func() {
				<-ctx.Done()
				if ctx.Err() == nil {
					broken.Add(1)
				}
			},
			func() {
				fired := make(chan struct{})
				ctx.AfterFunc(func() {
					checkDoneClosed()
					close(fired)
				})
				<-fired
			},
			func() {
				child, cancelChild := context.WithCancel(ctx)
				defer cancelChild()
				<-child.Done()
				checkDoneClosed()
			},
		}

		var readersDone sync.WaitGroup
		start := make(chan struct{})
		for _, reader := range readers {
			readersDone.Add(1)
			go func() {
				defer readersDone.Done()
				<-start
				reader()
			}()
		}
		close(start)
		if i%2 == 0 {
			cancelParent()
			ctx.cancel(context.Canceled)
		} else {
			ctx.cancel(context.Canceled)
			cancelParent()
		}
		readersDone.Wait()
	}
	if count := broken.Load(); count != 0 {
		t.Errorf("Err was non-nil while Done was open %d times, expected 0", count)
	}
	goleak.VerifyNone(t, before)
}

// TestRunCtxFollowGoexitEndsContext checks that the context ends after a
// handler calls runtime.Goexit. The parent never ends, so only the middleware can end it.
func TestRunCtxFollowGoexitEndsContext(t *testing.T) {
	skipWithoutThreadCPU(t)
	for _, path := range runPaths {
		t.Run(path.name, func(t *testing.T) {
			limiter, _ := runPathLimiter(t, path.budget)
			parent, cancelParent := context.WithCancel(context.Background())
			defer cancelParent()
			fired := make(chan struct{})
			handler := limiter.Middleware()(asynq.HandlerFunc(func(ctx context.Context, _ *asynq.Task) error {
				context.AfterFunc(ctx, func() { close(fired) })
				runtime.Goexit()
				return nil
			}))

			exited := make(chan struct{})
			go func() {
				defer close(exited)
				_ = handler.ProcessTask(parent, asynq.NewTask("exit", nil))
			}()
			<-exited
			select {
			case <-fired:
			case <-time.After(500 * time.Millisecond):
				t.Errorf("the handler's context was still open 500ms after the handler called runtime.Goexit, expected it to end with the task")
			}
		})
	}
}

// TestRunCtxFollowCause ends the run before its parent, as end does, and then the
// parent with a cause. The first cancellation sets the cause, so Cause is the run's error.
func TestRunCtxFollowCause(t *testing.T) {
	for _, follows := range []bool{true, false} {
		parent, cancelParent := context.WithCancelCause(context.Background())
		ctx := newRunCtx(parent, nil, time.Time{}, false)
		ctx.followsParent = follows
		child, cancelChild := context.WithCancel(ctx)
		ctx.cancel(context.Canceled)
		<-child.Done()
		cancelParent(errors.New("parent ended later"))

		if got := context.Cause(child); !errors.Is(got, context.Canceled) {
			t.Errorf("followsParent=%v: Cause(derived context) = %v, expected context.Canceled", follows, got)
		}
		if got := context.Cause(ctx); !errors.Is(got, context.Canceled) {
			t.Errorf("followsParent=%v: Err() = %v but Cause() = %v, expected context.Canceled, the cause of the first cancellation",
				follows, ctx.Err(), got)
		}
		cancelChild()
	}
}

// TestRunCtxFollowNestedLimiters runs tasks through two Limiters, so the inner run's parent is
// the outer run's context. AfterFuncs call back into the context while the task's context ends.
func TestRunCtxFollowNestedLimiters(t *testing.T) {
	skipWithoutThreadCPU(t)
	for _, outer := range runPaths {
		for _, inner := range runPaths {
			t.Run(outer.name+"/"+inner.name, func(t *testing.T) {
				outerLimiter, _ := runPathLimiter(t, Budget{CPU: outer.budget.CPU})
				innerLimiter, _ := runPathLimiter(t, Budget{CPU: inner.budget.CPU})
				before := goleak.IgnoreCurrent()
				var inlineRuns atomic.Int64
				handler := outerLimiter.Middleware()(innerLimiter.Middleware()(asynq.HandlerFunc(func(ctx context.Context, _ *asynq.Task) error {
					if run, ok := ctx.(*runCtx); ok && run.followsParent {
						inlineRuns.Add(1)
					}
					timed, cancelTimed := context.WithTimeout(ctx, time.Hour)
					defer cancelTimed()
					detached := context.WithoutCancel(ctx)

					var stops []func() bool
					for range 3 {
						stops = append(stops, context.AfterFunc(ctx, func() {
							_ = ctx.Err()
							<-ctx.Done()
							stop := context.AfterFunc(ctx, func() { _ = context.Cause(ctx) })
							stop()
							child, cancelChild := context.WithCancel(ctx)
							<-child.Done()
							cancelChild()
						}))
					}
					stops[0]()

					select {
					case <-timed.Done():
					case <-time.After(time.Millisecond):
					}
					if detached.Err() != nil {
						return errors.New("the WithoutCancel context ended")
					}
					if detached.Value(activeLimiterKey{}) != innerLimiter {
						return errors.New("the WithoutCancel context lost the active Limiter")
					}
					return nil
				})))

				var tasksDone sync.WaitGroup
				for i := range 200 {
					tasksDone.Add(1)
					go func() {
						defer tasksDone.Done()
						ctx, cancel := context.WithCancel(context.Background())
						defer cancel()
						if i%3 == 0 {
							go cancel()
						}
						err := handler.ProcessTask(ctx, asynq.NewTask("t", nil))
						if err != nil && !errors.Is(err, context.Canceled) {
							t.Errorf("ProcessTask = %v, expected nil or context.Canceled", err)
						}
					}()
				}
				allDone := make(chan struct{})
				go func() {
					tasksDone.Wait()
					close(allDone)
				}()
				select {
				case <-allDone:
				case <-time.After(20 * time.Second):
					stacks := make([]byte, 1<<20)
					t.Fatalf("tasks still running after 20s, possibly deadlocked:\n%s", stacks[:runtime.Stack(stacks, true)])
				}

				if got := inlineRuns.Load() > 0; got != inner.inline {
					t.Errorf("inline inner runs seen = %v, expected %v", got, inner.inline)
				}
				goleak.VerifyNone(t, before)
			})
		}
	}
}

// TestRunCtxFollowCloseSweep checks both Close checks of inline runs: a run that returns between
// them is not abandoned, and a stuck run in a Limiter closed twice counts once.
func TestRunCtxFollowCloseSweep(t *testing.T) {
	skipWithoutThreadCPU(t)
	const grace = 50 * time.Millisecond
	for _, stuck := range []bool{false, true} {
		name := "returns between the checks"
		wantAbandoned := 0.0
		if stuck {
			name = "stuck, closed twice"
			wantAbandoned = 1
		}
		t.Run(name, func(t *testing.T) {
			limiter, logs := runPathLimiter(t, Budget{CPU: 4, Concurrency: 1}, WithAbandonGrace(grace))
			before := goleak.IgnoreCurrent()
			task := startHeldTask(limiter)

			task.cancel()
			limiter.Close()
			if !stuck {
				close(task.release)
				if err := <-task.result; err != nil {
					t.Errorf("ProcessTask = %v, expected nil from a handler that returned within the grace period", err)
				}
			}
			limiter.Close()
			time.Sleep(3 * grace)

			queue := limiter.queue("")
			if got := testutil.ToFloat64(queue.metrics.abandoned); got != wantAbandoned {
				t.Errorf("abandoned = %v after Close and the grace period, expected %v", got, wantAbandoned)
			}
			if stuck {
				close(task.release)
				if err := <-task.result; !errors.Is(err, context.Canceled) {
					t.Errorf("ProcessTask = %v, expected the abandonment error", err)
				}
				if got := testutil.ToFloat64(queue.metrics.abandoned); got != 0 {
					t.Errorf("abandoned = %v after the handler returned, expected 0", got)
				}
			}
			if got := outcomeSum(queue); got != 1 {
				t.Errorf("tasks_total over all outcomes = %v, expected 1", got)
			}
			if count := strings.Count(logs.String(), "ignores its context"); count != int(wantAbandoned) {
				t.Errorf("abandonment logged %d times, expected %v", count, wantAbandoned)
			}
			goleak.VerifyNone(t, before)
		})
	}
}

// chanCtx is a context that the context package cannot look into, so
// context.AfterFunc on it starts a goroutine.
type chanCtx struct {
	context.Context
	done chan struct{}
}

func (c chanCtx) Done() <-chan struct{} { return c.done }

func (c chanCtx) Err() error {
	if isClosed(c.done) {
		return context.Canceled
	}
	return nil
}

func (c chanCtx) Value(any) any { return nil }

// TestRunCtxFollowCustomParentNoLeak checks that the end of an inline run stops the
// goroutine that watches a parent the context package cannot look into.
func TestRunCtxFollowCustomParentNoLeak(t *testing.T) {
	skipWithoutThreadCPU(t)
	limiter, _ := runPathLimiter(t, Budget{CPU: 4})
	before := goleak.IgnoreCurrent()
	parent := chanCtx{Context: context.Background(), done: make(chan struct{})}
	defer close(parent.done)
	handler := limiter.Middleware()(asynq.HandlerFunc(func(ctx context.Context, _ *asynq.Task) error {
		if run, ok := ctx.(*runCtx); !ok || !run.followsParent {
			t.Errorf("handler context is %T, expected an inline *runCtx", ctx)
		}
		_ = ctx.Done()
		return nil
	}))
	for range 10 {
		if err := handler.ProcessTask(parent, asynq.NewTask("t", nil)); err != nil {
			t.Fatal(err)
		}
	}
	goleak.VerifyNone(t, before)
}
