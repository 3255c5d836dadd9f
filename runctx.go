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
type runCtx struct {
	context.Context
	limiter     *Limiter
	deadline    time.Time
	hasDeadline bool
	// followsParent is true when the context must notice the end of its
	// parent itself, because the handler runs in the middleware's goroutine
	// and no one waits on the parent for it. Err then reads the parent's
	// error, and the first Done or AfterFunc starts a watch of the parent,
	// which stopFollow ends. Otherwise the middleware calls cancel when the
	// parent ends.
	followsParent bool
	stopFollow    func() bool

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

// Value returns the Limiter for activeLimiterKey, nothing for the key of
// the context package's cancelCtx, and the parent's value for any other key.
func (c *runCtx) Value(key any) any {
	if _, ok := key.(activeLimiterKey); ok {
		return c.limiter
	}
	if key == cancelCtxKey {
		return nil
	}
	return c.Context.Value(key)
}

// cancelCtxKey is the key that context.Cause passes to Value to find the
// nearest cancelCtx, whose cause it then returns. Passed on to the parent,
// that key would yield the parent's cause for a runCtx that ended first
// with another error. With no value for it, Cause returns Err instead. The
// key is not exported, so causeKeyProbe records it from a call of
// context.Cause. If a later Go looks the cause up differently,
// cancelCtxKey stays nil and no key matches.
var cancelCtxKey = func() any {
	probe := &causeKeyProbe{Context: context.Background()}
	_ = context.Cause(probe)
	return probe.key
}()

// causeKeyProbe is an ended context that records the first key passed to
// its Value. context.Cause looks up the key of an ended context only.
type causeKeyProbe struct {
	context.Context
	key any
}

func (p *causeKeyProbe) Err() error { return context.Canceled }

func (p *causeKeyProbe) Value(key any) any {
	if p.key == nil {
		p.key = key
	}
	return nil
}

// Deadline returns the budget's deadline, or the parent's when the budget
// sets none.
func (c *runCtx) Deadline() (time.Time, bool) {
	if c.hasDeadline {
		return c.deadline, true
	}
	return c.Context.Deadline()
}

// Done returns a channel that is closed when the context ends.
func (c *runCtx) Done() <-chan struct{} {
	if c.followsParent && c.Context.Err() != nil {
		c.cancel(nil) // takes the parent's error
	}
	c.mu.Lock()
	defer c.mu.Unlock()
	if c.done == nil {
		if c.err != nil {
			return closedChan
		}
		c.done = make(chan struct{})
		c.followLocked()
	}
	return c.done
}

// Err returns nil until the context ends, then the error it ended with.
func (c *runCtx) Err() error {
	if c.followsParent && c.Context.Err() != nil {
		// Ending the context here closes Done before Err reports the end.
		c.cancel(nil)
	}
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.err
}

// AfterFunc arranges for f to run in its own goroutine once the context
// ends. Calling stop before that keeps f from running.
func (c *runCtx) AfterFunc(f func()) (stop func() bool) {
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
	c.followLocked()
	c.mu.Unlock()

	return func() bool {
		c.mu.Lock()
		defer c.mu.Unlock()
		_, waiting := c.after[a]
		delete(c.after, a)
		return waiting
	}
}

// followLocked starts the watch of the parent of a context that follows it,
// once. The caller holds c.mu.
func (c *runCtx) followLocked() {
	if c.followsParent && c.stopFollow == nil {
		c.stopFollow = context.AfterFunc(c.Context, func() { c.cancel(nil) })
	}
}

// cancel ends the context with err, and later calls do nothing. A context
// that follows its parent ends with the parent's error once the parent has
// ended. A nil err ends only such a context, and only after its parent.
func (c *runCtx) cancel(err error) {
	if c.followsParent {
		if parentErr := c.Context.Err(); parentErr != nil {
			err = parentErr
		}
	}
	c.mu.Lock()
	if c.err != nil || err == nil {
		c.mu.Unlock()
		return
	}
	c.err = err
	if c.done != nil {
		close(c.done)
	}
	after := c.after
	c.after = nil
	stop := c.stopFollow
	c.mu.Unlock()

	if stop != nil {
		stop()
	}
	for a := range after {
		go a.f()
	}
}
