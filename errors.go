package asynqlimit

import (
	"errors"
	"fmt"
	"strings"
	"time"
)

// ErrOverBudget is the errors.Is target of every deferral. A handler error
// that matches it is not a failure: the wrapped asynq config moves the task
// back to the retry set without spending one of its retries.
var ErrOverBudget = errors.New("asynqlimit: over budget")

// ErrPayloadTooLarge is the errors.Is target of the error returned for a
// task whose payload is larger than its queue's MaxPayload.
var ErrPayloadTooLarge = errors.New("asynqlimit: payload too large")

// ErrTimedOut is the errors.Is target of the error returned when a task's
// handler is still running at the end of its run time. The error also
// matches context.DeadlineExceeded.
var ErrTimedOut = errors.New("asynqlimit: task timed out")

// Reason names why a task was deferred. It is the value of the reason label
// of asynqlimit_deferrals_total.
type Reason string

// The reasons for a deferral. A queue's Budget produces ReasonConcurrency,
// ReasonCPU and ReasonMemory. Limits.Process produces ReasonPressure, both
// for tasks that pressure sheds and for running tasks that hard memory
// pressure preempts. No limit produces ReasonRate or ReasonFleet in this
// version, but their series exist so dashboards need no change when rate
// and fleet limits arrive.
const (
	ReasonConcurrency Reason = "concurrency"
	ReasonCPU         Reason = "cpu"
	ReasonMemory      Reason = "memory"
	ReasonRate        Reason = "rate"
	ReasonPressure    Reason = "pressure"
	ReasonFleet       Reason = "fleet"
)

var allReasons = []Reason{
	ReasonConcurrency, ReasonCPU, ReasonMemory, ReasonRate, ReasonPressure, ReasonFleet,
}

// DeferError is the error the middleware returns when it defers a task. It
// wraps ErrOverBudget. Delay is how long asynq waits before it makes the task
// pending again; the wrapped RetryDelayFunc returns it.
//
// Only the DeferErrors that a Limiter creates are retry-neutral. A handler
// that returns ErrOverBudget or a DeferError of its own fails as with any
// other error, because a task that defers itself on every attempt would
// never finish and never reach the ErrorHandler.
type DeferError struct {
	Queue  string
	Reason Reason
	Delay  time.Duration

	// issued is true for the DeferErrors a Limiter creates.
	issued bool
}

// isDeferral reports whether err is, or wraps, a deferral by a Limiter.
func isDeferral(err error) (*DeferError, bool) {
	var de *DeferError
	if errors.As(err, &de) && de.issued {
		return de, true
	}
	return nil, false
}

// Error returns a message with the queue, the reason and the delay.
func (e *DeferError) Error() string {
	return fmt.Sprintf("asynqlimit: task deferred on queue %q (reason %s), retry in %s",
		e.Queue, e.Reason, e.Delay)
}

// Unwrap returns ErrOverBudget.
func (e *DeferError) Unwrap() error { return ErrOverBudget }

// FieldError is one invalid field of a Limits value.
type FieldError struct {
	// Path locates the field, as in Queues["low"].Concurrency.
	Path string
	// Message is the description of the problem and of a valid value.
	Message string
}

// Error returns the path followed by the message.
func (e FieldError) Error() string { return e.Path + ": " + e.Message }

// ConfigError lists every invalid field of a Limits value, so one run of New
// reports them all.
type ConfigError struct {
	Fields []FieldError
}

// Error returns every field error, separated by semicolons.
func (e *ConfigError) Error() string {
	parts := make([]string, len(e.Fields))
	for i, f := range e.Fields {
		parts[i] = f.Error()
	}
	return "asynqlimit: invalid limits: " + strings.Join(parts, "; ")
}
