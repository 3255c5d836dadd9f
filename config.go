package asynqlimit

import (
	"context"
	"runtime"
	"time"

	"github.com/hibiken/asynq"
)

// ServerConfig returns cfg with three functions wrapped so that a deferral
// costs the task nothing:
//
//   - IsFailure returns false for deferrals, so asynq neither increments the
//     task's Retried count nor counts it as failed. Other errors go to the
//     IsFailure of cfg, or count as failures when it is nil.
//   - RetryDelayFunc returns the delay the deferral chose. Other errors go to
//     the RetryDelayFunc of cfg, or to asynq.DefaultRetryDelayFunc.
//   - ErrorHandler does not see deferrals. Every other error reaches the
//     ErrorHandler of cfg, when it is set.
//
// It also logs a warning for each budget that cfg makes meaningless.
func (l *Limiter) ServerConfig(cfg asynq.Config) asynq.Config {
	l.checkServerConfig(cfg)
	cfg.IsFailure = wrapIsFailure(cfg.IsFailure)
	cfg.RetryDelayFunc = wrapRetryDelay(cfg.RetryDelayFunc)
	cfg.ErrorHandler = wrapErrorHandler(cfg.ErrorHandler)
	return cfg
}

func wrapIsFailure(user func(error) bool) func(error) bool {
	return func(err error) bool {
		if _, ok := isDeferral(err); ok {
			return false
		}
		if user != nil {
			return user(err)
		}
		return true
	}
}

func wrapRetryDelay(user asynq.RetryDelayFunc) asynq.RetryDelayFunc {
	if user == nil {
		user = asynq.DefaultRetryDelayFunc
	}
	return func(n int, err error, t *asynq.Task) time.Duration {
		if de, ok := isDeferral(err); ok {
			return de.Delay
		}
		return user(n, err, t)
	}
}

func wrapErrorHandler(user asynq.ErrorHandler) asynq.ErrorHandler {
	return asynq.ErrorHandlerFunc(func(ctx context.Context, t *asynq.Task, err error) {
		if _, ok := isDeferral(err); user == nil || ok {
			return
		}
		user.HandleError(ctx, t, err)
	})
}

// checkServerConfig warns about budgets that never apply with cfg: a queue
// the server does not serve, or a concurrency cap at or above the server's
// own.
func (l *Limiter) checkServerConfig(cfg asynq.Config) {
	workers := cfg.Concurrency
	if workers <= 0 {
		workers = runtime.NumCPU() // asynq's default
	}
	served := cfg.Queues
	if len(served) == 0 {
		served = map[string]int{"default": 1} // asynq's default
	}
	for name, b := range l.limits.Queues {
		if _, ok := served[name]; !ok {
			l.logger.Warn("asynqlimit: budget names a queue the server does not serve; add it to Config.Queues or remove the budget",
				"queue", name)
		}
		if b.Concurrency >= workers {
			l.logger.Warn("asynqlimit: queue concurrency budget is not below the server's Config.Concurrency, so it never applies",
				"queue", name, "concurrency", b.Concurrency, "server_concurrency", workers)
		}
	}
	if l.limits.Process.enabled() && !l.servesPriorityBelowHighest(served) {
		l.logger.Warn("asynqlimit: every queue the server serves has the highest Priority, so process pressure never sheds or preempts a task; give less important queues a lower Budget.Priority")
	}
}

// servesPriorityBelowHighest reports whether a served queue has a Priority
// below the highest, so that process pressure can shed or preempt it.
func (l *Limiter) servesPriorityBelowHighest(served map[string]int) bool {
	for name := range served {
		if l.queue(name).budget.Priority < l.highestPriority {
			return true
		}
	}
	return false
}
