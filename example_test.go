package asynqlimit_test

import (
	"context"
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

// The middleware archives a task whose payload is over its queue's
// MaxPayload, without running it.
func ExampleLimiter_Middleware() {
	l, err := asynqlimit.New(asynqlimit.Limits{Default: asynqlimit.Budget{MaxPayload: 4}})
	if err != nil {
		panic(err)
	}
	defer l.Close()
	handler := l.Middleware()(asynq.HandlerFunc(func(context.Context, *asynq.Task) error {
		fmt.Println("handler ran")
		return nil
	}))

	fmt.Println(handler.ProcessTask(context.Background(), asynq.NewTask("t", []byte("ok"))))
	err = handler.ProcessTask(context.Background(), asynq.NewTask("t", []byte("too large")))
	fmt.Println(errors.Is(err, asynqlimit.ErrPayloadTooLarge), errors.Is(err, asynq.SkipRetry))
	// Output:
	// handler ran
	// <nil>
	// true true
}

// ServerConfig wraps the functions of the config; errors other than the
// Limiter's deferrals go to the ones the config had, or to asynq's defaults.
func ExampleLimiter_ServerConfig() {
	l, err := asynqlimit.New(asynqlimit.Limits{})
	if err != nil {
		panic(err)
	}
	defer l.Close()
	cfg := l.ServerConfig(asynq.Config{
		Concurrency:    10,
		RetryDelayFunc: func(int, error, *asynq.Task) time.Duration { return time.Minute },
	})

	failure := errors.New("smtp: connection refused")
	fmt.Println(cfg.IsFailure(failure), cfg.RetryDelayFunc(0, failure, nil))
	// Output:
	// true 1m0s
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
