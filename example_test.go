package asynqlimit_test

import (
	"errors"
	"fmt"
	"time"

	"github.com/hibiken/asynq"

	"github.com/asynqlimit/asynqlimit"
)

// New reports every invalid field at once.
func ExampleNew_invalid() {
	_, err := asynqlimit.New(asynqlimit.Limits{
		Queues: map[string]asynqlimit.Budget{
			"low": {Concurrency: -1, Timeout: -time.Second},
		},
	})
	var cerr *asynqlimit.ConfigError
	if errors.As(err, &cerr) {
		for _, f := range cerr.Fields {
			fmt.Println(f)
		}
	}
	// Output:
	// Queues["low"].Concurrency: must be >= 0, got -1 (0 means no cap)
	// Queues["low"].Timeout: must be >= 0, got -1s (0 means the task's own deadline)
}

// A deferral is not a failure, and it chooses its own retry delay.
func ExampleLimiter_ServerConfig() {
	l, err := asynqlimit.New(asynqlimit.Limits{})
	if err != nil {
		panic(err)
	}
	defer l.Close()
	cfg := l.ServerConfig(asynq.Config{Concurrency: 10})

	deferral := &asynqlimit.DeferError{Queue: "low", Reason: asynqlimit.ReasonConcurrency, Delay: 2 * time.Second}
	fmt.Println(cfg.IsFailure(deferral), cfg.RetryDelayFunc(0, deferral, nil))
	fmt.Println(cfg.IsFailure(errors.New("smtp: connection refused")))
	// Output:
	// false 2s
	// true
}

// A handler can tell a deferral from a failure with errors.Is and read its
// details with errors.As.
func ExampleDeferError() {
	var err error = &asynqlimit.DeferError{Queue: "low", Reason: asynqlimit.ReasonConcurrency, Delay: time.Second}
	var de *asynqlimit.DeferError
	fmt.Println(errors.Is(err, asynqlimit.ErrOverBudget), errors.As(err, &de), de.Reason)
	fmt.Println(err)
	// Output:
	// true true concurrency
	// asynqlimit: task deferred on queue "low" (reason concurrency), retry in 1s
}
