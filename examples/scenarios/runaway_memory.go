package main

import (
	"context"
	"fmt"
	"log/slog"
	"os"
	"runtime"
	"runtime/debug"
	"time"

	"github.com/hibiken/asynq"

	"github.com/asynqlimit/asynqlimit"
)

// Workload and limits of the runaway-memory scenario.
const (
	// runawayTaskBytes is what each low task allocates and touches.
	runawayTaskBytes = 100 << 20
	// runawayHold is how long a low task holds its memory, unless its
	// context ends first.
	runawayHold = 2 * time.Second
	// runawayLowEvery and runawayCriticalEvery are the intervals at which
	// the parent enqueues low and critical tasks. Eight low tasks a second
	// that hold 100 MiB for 2s ask for 16 workers and 1.6 GiB.
	runawayLowEvery      = 125 * time.Millisecond
	runawayCriticalEvery = 50 * time.Millisecond
	// runawayConcurrency is asynq's Concurrency in both runs. It caps the
	// handlers that run at once, so a run without the library holds at most
	// 12 low tasks, about 1.2 GiB.
	runawayConcurrency = 12

	runawaySoft           = 300 << 20
	runawayHard           = 400 << 20
	runawaySampleInterval = 50 * time.Millisecond
	runawayGrace          = 250 * time.Millisecond
)

// Queue names and task types of the runaway-memory scenario.
const (
	runawayCriticalQueue = "critical"
	runawayLowQueue      = "low"
	runawayCriticalType  = "critical:ping"
	runawayLowType       = "low:allocate"
)

// The variants of the runaway-memory scenario.
const (
	variantWith    = "with asynqlimit"
	variantWithout = "plain asynq"
)

var runawayMemory = scenario{
	summary: "low tasks that each hold 100 MiB flood a worker beside quick critical tasks; hard threshold 400 MiB",
	run:     runRunawayMemory,
	worker:  runawayWorker,
}

// runRunawayMemory runs the scenario with and without the library and
// prints the table.
func runRunawayMemory(ctx context.Context, env *environment) error {
	fmt.Printf("runaway-memory: every %s a low task that holds %d MiB for %s, every %s a critical task; "+
		"asynq Concurrency %d; each run loaded for %s\n",
		runawayLowEvery, runawayTaskBytes>>20, runawayHold, runawayCriticalEvery, runawayConcurrency, env.duration)
	fmt.Printf("with asynqlimit: MemorySoft %d MiB, MemoryHard %d MiB, Grace %s, sample interval %s, low TaskMemory %d MiB\n\n",
		runawaySoft>>20, runawayHard>>20, runawayGrace, runawaySampleInterval, runawayTaskBytes>>20)

	var results []*variantResult
	for _, variant := range []string{variantWith, variantWithout} {
		result, err := runVariant(ctx, env, "runaway-memory", variant, runawayLoad)
		if err != nil {
			return err
		}
		results = append(results, result)
	}
	printResults(os.Stdout, results, runawayHard, tableQueues{critical: runawayCriticalQueue, low: runawayLowQueue})
	return nil
}

// runawayLoad enqueues low and critical tasks at their intervals until ctx
// ends.
func runawayLoad(ctx context.Context, client *asynq.Client) (map[string]int, error) {
	enqueued := map[string]int{}
	lowTicker := time.NewTicker(runawayLowEvery)
	defer lowTicker.Stop()
	criticalTicker := time.NewTicker(runawayCriticalEvery)
	defer criticalTicker.Stop()
	// Completed tasks are kept so that asynq.Inspector can count them.
	retention := asynq.Retention(time.Hour)
	for {
		var err error
		select {
		case <-ctx.Done():
			return enqueued, nil
		case <-lowTicker.C:
			_, err = client.EnqueueContext(ctx, asynq.NewTask(runawayLowType, nil), asynq.Queue(runawayLowQueue), retention)
			if err == nil {
				enqueued[runawayLowQueue]++
			}
		case now := <-criticalTicker.C:
			var task *asynq.Task
			if task, err = newCriticalTask(runawayCriticalType, now); err == nil {
				_, err = client.EnqueueContext(ctx, task, asynq.Queue(runawayCriticalQueue), retention)
			}
			if err == nil {
				enqueued[runawayCriticalQueue]++
			}
		}
		if err != nil && ctx.Err() == nil {
			return enqueued, err
		}
	}
}

// runawayWorker builds the server of one variant: asynqlimit.NewServer with
// process limits, or a plain asynq.NewServer. Both run the same handlers.
func runawayWorker(run *workerRun) (workerServer, asynq.Handler, error) {
	mux := asynq.NewServeMux()
	mux.Handle(runawayCriticalType, run.latencies)
	mux.HandleFunc(runawayLowType, func(ctx context.Context, _ *asynq.Task) error {
		return holdHeapMemory(ctx, runawayTaskBytes, runawayHold)
	})

	cfg := asynq.Config{
		Concurrency: runawayConcurrency,
		Queues:      map[string]int{runawayCriticalQueue: 6, runawayLowQueue: 1},
		// asynq waits TaskCheckInterval (1s by default) after it finds
		// every queue empty, which would dominate the critical latency.
		TaskCheckInterval: 20 * time.Millisecond,
		// Deferred tasks return to pending on this tick (5s by default).
		DelayedTaskCheckInterval: time.Second,
		ShutdownTimeout:          5 * time.Second,
		LogLevel:                 asynqLogLevel(run.logger),
	}
	redis := run.redis
	switch run.variant {
	case variantWithout:
		return asynq.NewServer(redis, cfg), mux, nil
	case variantWith:
		limits := asynqlimit.Limits{
			Queues: map[string]asynqlimit.Budget{
				runawayCriticalQueue: {Priority: 1},
				// TaskMemory lets admission count the memory of running
				// tasks that the samples do not show yet, and orders
				// preemption.
				runawayLowQueue: {Priority: 0, TaskMemory: runawayTaskBytes},
			},
			Process: asynqlimit.ProcessLimits{MemorySoft: runawaySoft, MemoryHard: runawayHard, Grace: runawayGrace},
		}
		srv, err := asynqlimit.NewServer(redis, cfg, limits, asynqlimit.WithRegisterer(run.registry),
			asynqlimit.WithLogger(run.logger), asynqlimit.WithSampleInterval(runawaySampleInterval))
		if err != nil {
			return nil, nil, err
		}
		return srv, mux, nil
	}
	return nil, nil, fmt.Errorf("unknown variant %q of runaway-memory: use %q or %q", run.variant, variantWith, variantWithout)
}

// holdHeapMemory allocates size bytes on the Go heap, touches every page so
// that they are resident, and holds them for hold or until ctx ends, when it
// returns ctx.Err().
//
// It then calls debug.FreeOSMemory, which collects the buffer and returns
// its pages to the operating system at once. Without it RSS would follow the
// garbage collector's pacing and the scavenger, not the memory that tasks
// hold. Both runs use this handler.
func holdHeapMemory(ctx context.Context, size int, hold time.Duration) error {
	buf := make([]byte, size)
	page := os.Getpagesize()
	for i := 0; i < len(buf); i += page {
		buf[i] = 1
	}

	timer := time.NewTimer(hold)
	defer timer.Stop()
	var err error
	select {
	case <-ctx.Done():
		err = ctx.Err()
	case <-timer.C:
	}
	runtime.KeepAlive(buf)
	debug.FreeOSMemory()
	return err
}

// asynqLogLevel returns the asynq log level that lets through what logger
// lets through.
func asynqLogLevel(logger *slog.Logger) asynq.LogLevel {
	ctx := context.Background()
	switch {
	case logger.Enabled(ctx, slog.LevelDebug):
		return asynq.DebugLevel
	case logger.Enabled(ctx, slog.LevelInfo):
		return asynq.InfoLevel
	case logger.Enabled(ctx, slog.LevelWarn):
		return asynq.WarnLevel
	}
	return asynq.ErrorLevel
}
