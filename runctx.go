package asynqlimit

import (
	"context"
	"sync"
	"time"
)

// closedChan is returned by Done of a runCtx that ended before anyone asked
// for its channel.
var closedChan = func() chan struct{} {
	c := make(chan struct{})
	close(c)
	return c
}()

// runCtx is the context a handler runs under: its parent with the deadline
// of the queue's budget. context.WithDeadline would do the same with four
// allocations and a timer per task. runCtx costs one allocation, creates its
// channel only when the handler calls Done, and leaves the timer to the
// middleware, which ends the context with cancel.
//
// It implements the AfterFunc method that the context package looks for, so
// contexts the handler derives from it need no goroutine of their own.
//
// An inherited runCtx is its parent and the Limiter's value, nothing more:
// it ends when the parent ends, and cancel does nothing. It serves handlers
// that run in the middleware's own goroutine, where nothing but the parent
// can end the context while the handler runs.
type runCtx struct {
	context.Context
	limiter     *Limiter
	deadline    time.Time
	hasDeadline bool
	inherited   bool

	mu    sync.Mutex
	done  chan struct{}
	err   error
	after map[*afterFunc]struct{}
}

type afterFunc struct{ f func() }

// activeLimiterKey is the context key under which a runCtx stores the
// Limiter whose middleware runs the handler.
type activeLimiterKey struct{}

func newRunCtx(parent context.Context, l *Limiter, deadline time.Time, hasDeadline bool) *runCtx {
	return &runCtx{Context: parent, limiter: l, deadline: deadline, hasDeadline: hasDeadline}
}

// Value returns the Limiter for activeLimiterKey and the parent's value for
// any other key.
func (c *runCtx) Value(key any) any {
	if _, ok := key.(activeLimiterKey); ok {
		return c.limiter
	}
	return c.Context.Value(key)
}

// Deadline returns the budget's deadline, or the parent's when the budget
// sets none.
func (c *runCtx) Deadline() (time.Time, bool) {
	if c.hasDeadline {
		return c.deadline, true
	}
	return c.Context.Deadline()
}

// Done returns a channel that is closed when cancel ends the context, or the
// parent's channel when the context is inherited.
func (c *runCtx) Done() <-chan struct{} {
	if c.inherited {
		return c.Context.Done()
	}
	c.mu.Lock()
	defer c.mu.Unlock()
	if c.done == nil {
		if c.err != nil {
			return closedChan
		}
		c.done = make(chan struct{})
	}
	return c.done
}

// Err returns nil until cancel ends the context, then the error it ended
// with. An inherited context returns the parent's error.
func (c *runCtx) Err() error {
	if c.inherited {
		return c.Context.Err()
	}
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.err
}

// AfterFunc arranges for f to run in its own goroutine once the context
// ends. Calling stop before that keeps f from running.
func (c *runCtx) AfterFunc(f func()) (stop func() bool) {
	if c.inherited {
		return context.AfterFunc(c.Context, f)
	}
	a := &afterFunc{f: f}
	c.mu.Lock()
	if c.err != nil {
		c.mu.Unlock()
		go f()
		return func() bool { return false }
	}
	if c.after == nil {
		c.after = make(map[*afterFunc]struct{})
	}
	c.after[a] = struct{}{}
	c.mu.Unlock()

	return func() bool {
		c.mu.Lock()
		defer c.mu.Unlock()
		_, waiting := c.after[a]
		delete(c.after, a)
		return waiting
	}
}

// cancel ends the context with err; later calls do nothing, and so does a
// call on an inherited context.
func (c *runCtx) cancel(err error) {
	if c.inherited {
		return
	}
	c.mu.Lock()
	if c.err != nil {
		c.mu.Unlock()
		return
	}
	c.err = err
	if c.done != nil {
		close(c.done)
	}
	after := c.after
	c.after = nil
	c.mu.Unlock()

	for a := range after {
		go a.f()
	}
}
