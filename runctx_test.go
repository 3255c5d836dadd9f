package asynqlimit

import (
	"context"
	"errors"
	"testing"
	"time"
)

type ctxKey struct{}

func TestRunCtxCancel(t *testing.T) {
	parent := context.WithValue(context.Background(), ctxKey{}, "v")
	deadline := time.Now().Add(time.Hour)
	c := newRunCtx(parent, nil, deadline, true)

	if got, ok := c.Deadline(); !ok || !got.Equal(deadline) {
		t.Errorf("Deadline() = %v, %v; want %v, true", got, ok, deadline)
	}
	if got := c.Value(ctxKey{}); got != "v" {
		t.Errorf("Value() = %v, want the parent's v", got)
	}
	if err := c.Err(); err != nil {
		t.Fatalf("Err() before cancel = %v, want nil", err)
	}
	done := c.Done()
	select {
	case <-done:
		t.Fatal("Done() closed before cancel")
	default:
	}

	c.cancel(context.DeadlineExceeded)
	c.cancel(context.Canceled)
	<-done
	if err := c.Err(); !errors.Is(err, context.DeadlineExceeded) {
		t.Errorf("Err() = %v, want the first cancel's DeadlineExceeded", err)
	}
}

func TestRunCtxDoneAfterCancel(t *testing.T) {
	c := newRunCtx(context.Background(), nil, time.Time{}, false)
	c.cancel(context.Canceled)
	select {
	case <-c.Done():
	default:
		t.Error("Done() asked for after cancel is open, want closed")
	}
}

func TestRunCtxParentDeadline(t *testing.T) {
	parent, cancel := context.WithDeadline(context.Background(), time.Now().Add(time.Minute))
	defer cancel()
	want, _ := parent.Deadline()
	c := newRunCtx(parent, nil, time.Time{}, false)
	if got, ok := c.Deadline(); !ok || !got.Equal(want) {
		t.Errorf("Deadline() = %v, %v; want the parent's %v", got, ok, want)
	}
}

func TestRunCtxDerivedContexts(t *testing.T) {
	c := newRunCtx(context.Background(), nil, time.Time{}, false)
	child, cancelChild := context.WithTimeout(c, time.Hour)
	defer cancelChild()
	stopped := make(chan struct{})
	stop := context.AfterFunc(c, func() { close(stopped) })
	never := context.AfterFunc(c, func() { t.Error("AfterFunc ran after stop") })
	if !never() {
		t.Error("stop() = false before cancel, want true")
	}

	c.cancel(context.Canceled)
	select {
	case <-child.Done():
	case <-time.After(5 * time.Second):
		t.Fatal("derived context still open 5s after cancel")
	}
	if err := child.Err(); !errors.Is(err, context.Canceled) {
		t.Errorf("derived Err() = %v, want Canceled", err)
	}
	<-stopped
	if stop() {
		t.Error("stop() = true after the function ran, want false")
	}
}

func TestRunCtxAfterFuncWhenEnded(t *testing.T) {
	c := newRunCtx(context.Background(), nil, time.Time{}, false)
	c.cancel(context.Canceled)
	ran := make(chan struct{})
	stop := c.AfterFunc(func() { close(ran) })
	<-ran
	if stop() {
		t.Error("stop() = true for a function that already ran, want false")
	}
}

// TestRunCtxFollowsParent checks that a context that follows its parent
// ends with the parent, through Done, Err, AfterFunc and derived contexts.
func TestRunCtxFollowsParent(t *testing.T) {
	parent, cancelParent := context.WithCancel(context.Background())
	l := &Limiter{}
	c := newRunCtx(parent, l, time.Time{}, false)
	c.followsParent = true
	if got := c.Value(activeLimiterKey{}); got != l {
		t.Errorf("Value(activeLimiterKey{}) = %v, want the Limiter", got)
	}
	child, stopChild := context.WithCancel(c)
	defer stopChild()
	fired := make(chan struct{})
	context.AfterFunc(c, func() { close(fired) })
	done := c.Done()

	cancelParent()
	<-done
	<-child.Done()
	<-fired
	if err := c.Err(); !errors.Is(err, context.Canceled) {
		t.Errorf("Err() after the parent ended = %v, want context.Canceled", err)
	}
}

// TestRunCtxFollowsParentCancel checks that cancel ends a context that
// follows a live parent, as the middleware does when the task ends.
func TestRunCtxFollowsParentCancel(t *testing.T) {
	parent, cancelParent := context.WithCancel(context.Background())
	defer cancelParent()
	c := newRunCtx(parent, nil, time.Time{}, false)
	c.followsParent = true
	child, stopChild := context.WithCancel(c)
	defer stopChild()

	c.cancel(context.Canceled)
	<-child.Done()
	if err := c.Err(); !errors.Is(err, context.Canceled) {
		t.Errorf("Err() after cancel = %v, want context.Canceled", err)
	}
	if err := parent.Err(); err != nil {
		t.Errorf("parent Err() = %v after cancel of the child context, want nil", err)
	}
}

// TestRunCtxFollowsParentError checks that a context that follows its
// parent keeps the parent's error when cancel comes later, even when no one
// asked for Done, so a handler past asynq's deadline counts as timed out.
func TestRunCtxFollowsParentError(t *testing.T) {
	parent, cancelParent := context.WithDeadline(context.Background(), time.Now().Add(-time.Second))
	defer cancelParent()
	c := newRunCtx(parent, nil, time.Time{}, false)
	c.followsParent = true

	c.cancel(context.Canceled)
	if err := c.Err(); !errors.Is(err, context.DeadlineExceeded) {
		t.Errorf("Err() = %v, want the parent's context.DeadlineExceeded", err)
	}
	select {
	case <-c.Done():
	default:
		t.Error("Done() is open after the context ended")
	}
}
