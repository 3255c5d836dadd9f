// Package asynqlimit keeps an asynq worker alive and fair when tasks
// misbehave. It gives each queue a budget (concurrency, run time, payload
// size, CPU and memory), sheds low-priority queues when the whole process
// is under memory or CPU pressure, defers tasks that do not fit without
// spending their retries, and exports a Prometheus metric for every
// decision.
//
// # Quick start
//
// Swap asynq.NewServer for NewServer, or apply Middleware and ServerConfig
// to a server you build yourself:
//
//	limits := asynqlimit.Limits{
//		Queues: map[string]asynqlimit.Budget{
//			"critical": {Concurrency: 8, Priority: 2},
//			"low":      {Concurrency: 2, Timeout: 30 * time.Second, MaxPayload: 64 << 10},
//		},
//		Default: asynqlimit.Budget{Concurrency: 4},
//	}
//	reg := prometheus.NewRegistry()
//	redis := asynq.RedisClientOpt{Addr: "127.0.0.1:6379"}
//	srv, err := asynqlimit.NewServer(redis, asynq.Config{
//		Concurrency: 16,
//		Queues:      map[string]int{"critical": 6, "default": 3, "low": 1},
//	}, limits, asynqlimit.WithRegisterer(reg), asynqlimit.WithLogger(slog.Default()))
//	if err != nil {
//		log.Fatal(err) // a *ConfigError lists every invalid field
//	}
//	go http.ListenAndServe("127.0.0.1:2112", promhttp.HandlerFor(reg, promhttp.HandlerOpts{}))
//	mux := asynq.NewServeMux()
//	mux.HandleFunc("email:send", sendEmail)
//	if err := srv.Run(mux); err != nil {
//		log.Fatal(err)
//	}
//
// With a server of your own:
//
//	l, err := asynqlimit.New(limits, asynqlimit.WithRegisterer(reg))
//	...
//	// goredis is github.com/redis/go-redis/v9. asynq does not close a
//	// client it was given, so close it after Shutdown.
//	client := redis.MakeRedisClient().(goredis.UniversalClient)
//	l.InstrumentRedis(client) // the dequeue gate; optional
//	srv := asynq.NewServerFromRedisClient(client, l.ServerConfig(cfg))
//	mux.Use(l.Middleware()) // first, so it runs outermost
//	...
//	// After srv.Shutdown: stop the sampling goroutine and restore the Go
//	// memory limit that ProcessLimits.SetGoMemoryLimit set.
//	l.Close()
//
// # Budgets
//
// Limits maps queue names to a Budget; Default applies to every other queue.
// Concurrency caps the handlers of a queue that run at once in this process,
// counting handlers that ignore their context until they really return.
// Timeout is both the default and the maximum run time of a task, and works
// below one second, which asynq's own timeouts do not. MaxPayload archives a
// task whose payload is too large, without running it. Memory caps the
// memory that a queue's running tasks reserve together, each its
// TaskMemory or what a WithMemoryEstimator function returns. Go cannot
// measure one goroutine's memory, so these are estimates. CPU and TaskCPU
// are described under CPU below.
//
// # Deferral
//
// asynq has dequeued a task before any middleware runs, so a task whose queue
// is full is handed back: the handler returns a *DeferError, which wraps
// ErrOverBudget. The config returned by ServerConfig makes asynq move it to
// the retry set without incrementing Retried, wait the delay the deferral
// chose (which backs off while the queue stays full), and keep it from the
// ErrorHandler. asynq archives a task on its last attempt on any error, so
// such a task is never deferred: it waits for room instead, until its context
// ends.
//
// # Dequeue gate
//
// A deferral costs several Redis scripts and moves the task behind newer
// ones, and a full queue keeps being dequeued. So NewServer builds asynq's
// Redis client itself and adds a go-redis hook to it (InstrumentRedis does
// the same for a client of your own). The hook recognises asynq's dequeue
// script call for a queue, and while admission would defer the queue's next
// task it returns redis.Nil without sending the call. asynq takes that for an
// empty queue and polls the next one, so the task stays pending, in order.
// The gate reads the state that admission reads, without locks: concurrency
// slots, pressure shedding, the CPU and memory budgets, and the tasks that it
// let asynq dequeue that have not reached admission yet. The middleware stays
// the final check. In observe mode the gate counts the dequeues it would skip
// and skips none. If the middleware handles 20 tasks and the hook has not
// recognised a dequeue call, because the client is not the server's or asynq
// (v0.26.0 here) changed its script, the gate switches itself off with a
// warning. WithoutGate turns it off.
//
// # Pressure
//
// Limits.Process sets soft and hard thresholds on the memory and CPU of the
// whole process, sampled every WithSampleInterval. Under pressure the queues
// of the lowest Budget.Priority are shed: their new tasks are deferred with
// reason "pressure", one more priority level per sample while pressure lasts,
// never the highest priority. Hard memory pressure also preempts running
// tasks of the lowest priority, largest memory reservation first, one per
// sample; they are deferred without spending a retry. Hard CPU pressure
// sheds but preempts nothing. Admission also counts the memory
// reservations of the running tasks that the samples do not show yet (see
// Budget.TaskMemory).
//
// # CPU
//
// Budget.CPU caps the cores that a queue's tasks use together, averaged over
// WithCPUWindow; new tasks of a queue over it are deferred with reason "cpu".
// Budget.TaskCPU ends the context of a task that uses more CPU time, checked
// every WithSampleInterval, so a task can pass it by up to one interval. Each
// task's CPU time is read, on Linux only, from the clock of the OS thread
// its handler is locked to while it runs, so CPU used by goroutines the
// handler starts is not counted. WithoutCPUAccounting turns this off.
//
// The middleware calls most handlers in a goroutine of their own, so that it
// can return at the queue's Timeout, at TaskCPU or at preemption even when
// the handler ignores its context. Some tasks run in asynq's goroutine
// instead, which saves two thread wake-ups. This applies when the queue
// accounts CPU, has no TaskCPU and no Timeout that ends before asynq's
// deadline for the task, and the task cannot be preempted (its queue has the
// highest priority, or there is no hard memory threshold). There a handler that calls runtime.Goexit
// fails at asynq's deadline, as without the middleware, rather than at once,
// and a handler that outlives its context counts as abandoned at a CPU
// sample after the grace period (WithAbandonGrace).
//
// # Observe mode
//
// With Mode: Observe every decision is made, counted and logged, but every
// task runs, and a queue's Timeout does not end the handler's context. Use it
// to tune limits on production traffic.
//
// # Metrics
//
// With WithRegisterer the Limiter registers these metrics, all in the
// namespace asynqlimit. The README has a table with the meaning of each.
// The queue label is a configured queue name or "other", which covers
// every unnamed queue.
//
//   - Tasks, with a queue label: tasks_in_flight, tasks_total{outcome},
//     deferrals_total{reason}, rejections_total{reason}, waits_total,
//     timeouts_total, preemptions_total, task_duration_seconds and
//     abandoned_tasks.
//   - Budgets, with a queue label: queue_concurrency_limit,
//     task_cpu_seconds, queue_cpu_cores, queue_cpu_budget_cores,
//     queue_memory_reserved_bytes and queue_memory_budget_bytes.
//   - Dequeue gate: gate_closed and gate_skips_total, with a queue label,
//     and gate_disabled.
//   - Process pressure: process_resident_memory_bytes, process_cpu_cores,
//     process_limit{resource,threshold}, pressure{resource} and
//     sampler_errors_total. They read 0 when Limits.Process sets no
//     threshold.
//   - asynq's own queues, with an asynq.Inspector (WithInspector, or
//     NewServer with a registerer): queue_tasks{queue,state},
//     queue_latency_seconds{queue}, queue_paused{queue} and
//     queue_inspect_errors_total, read at most once per
//     WithInspectInterval.
//
// Nothing is registered without a registerer, and never on the global
// registry unless it is passed.
//
// # Logs
//
// Every deferral, rejection, timeout and abandoned handler is logged through
// the *slog.Logger given with WithLogger, with the queue, task id, task type,
// reason and the numbers compared, at most WithLogRate lines per queue.
// Payloads are never logged. The dequeue gate logs when it closes or opens
// a queue, at most twice per queue every 10 seconds.
package asynqlimit
