package asynqlimit

import (
	"context"
	"errors"
	"fmt"
	"testing"
	"time"

	"github.com/hibiken/asynq"
)

func TestServerConfigWrapsUserFunctions(t *testing.T) {
	l, err := New(Limits{})
	if err != nil {
		t.Fatal(err)
	}
	var handled []error
	userErr := errors.New("user failure")
	cfg := l.ServerConfig(asynq.Config{
		IsFailure:      func(err error) bool { return !errors.Is(err, userErr) },
		RetryDelayFunc: func(int, error, *asynq.Task) time.Duration { return 42 * time.Second },
		ErrorHandler: asynq.ErrorHandlerFunc(func(_ context.Context, _ *asynq.Task, err error) {
			handled = append(handled, err)
		}),
	})
	deferral := fmt.Errorf("wrapped: %w", &DeferError{Queue: "low", Reason: ReasonConcurrency, Delay: 3 * time.Second, issued: true})
	other := errors.New("boom")
	task := asynq.NewTask("t", nil)

	if cfg.IsFailure(deferral) {
		t.Errorf("IsFailure(deferral) = true, want false")
	}
	if cfg.IsFailure(userErr) {
		t.Errorf("IsFailure(userErr) = true, want the user's false")
	}
	if !cfg.IsFailure(other) {
		t.Errorf("IsFailure(other) = false, want the user's true")
	}
	if got := cfg.RetryDelayFunc(0, deferral, task); got != 3*time.Second {
		t.Errorf("RetryDelayFunc(deferral) = %s, want 3s", got)
	}
	if got := cfg.RetryDelayFunc(0, other, task); got != 42*time.Second {
		t.Errorf("RetryDelayFunc(other) = %s, want the user's 42s", got)
	}
	cfg.ErrorHandler.HandleError(context.Background(), task, deferral)
	cfg.ErrorHandler.HandleError(context.Background(), task, other)
	if len(handled) != 1 || handled[0] != other {
		t.Errorf("user ErrorHandler saw %v, want only [%v]", handled, other)
	}
}

func TestServerConfigDefaults(t *testing.T) {
	l, err := New(Limits{})
	if err != nil {
		t.Fatal(err)
	}
	cfg := l.ServerConfig(asynq.Config{})
	other := errors.New("boom")
	task := asynq.NewTask("t", nil)

	if !cfg.IsFailure(other) {
		t.Errorf("IsFailure(other) = false without a user function, want true")
	}
	if cfg.IsFailure(&DeferError{issued: true}) {
		t.Errorf("IsFailure(deferral) = true, want false")
	}
	if got := cfg.RetryDelayFunc(3, other, task); got <= 0 {
		t.Errorf("RetryDelayFunc(other) = %s without a user function, want asynq's positive default", got)
	}
	cfg.ErrorHandler.HandleError(context.Background(), task, other) // must not panic without a user handler
}

func TestHandlerDeferralIsFailure(t *testing.T) {
	l, err := New(Limits{})
	if err != nil {
		t.Fatal(err)
	}
	cfg := l.ServerConfig(asynq.Config{})
	for _, err := range []error{
		ErrOverBudget,
		fmt.Errorf("quota: %w", ErrOverBudget),
		&DeferError{Queue: "q", Reason: ReasonRate, Delay: time.Second},
	} {
		if !cfg.IsFailure(err) {
			t.Errorf("IsFailure(%v) = false, want true for an error a handler returned", err)
		}
	}
}

func TestDeferErrorMatches(t *testing.T) {
	err := fmt.Errorf("outer: %w", &DeferError{Queue: "low", Reason: ReasonConcurrency, Delay: time.Second})
	if !errors.Is(err, ErrOverBudget) {
		t.Errorf("errors.Is(%v, ErrOverBudget) = false, want true", err)
	}
	var de *DeferError
	if !errors.As(err, &de) || de.Queue != "low" || de.Reason != ReasonConcurrency {
		t.Errorf("errors.As(%v) = %+v, want queue low, reason concurrency", err, de)
	}
}
