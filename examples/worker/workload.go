package main

import (
	"bytes"
	"context"
	"encoding/json"
	"fmt"
	"time"

	"github.com/hibiken/asynq"
)

// Task types of the workload.
const (
	// typeSleep tasks sleep for the duration in their payload and return
	// early when their context ends.
	typeSleep = "example:sleep"
	// typeStuck tasks ignore their context on their first attempt.
	typeStuck = "example:stuck"
	// typeUpload tasks carry a payload of arbitrary size.
	typeUpload = "example:upload"
)

// stuckSleep is how long a typeStuck task runs on its first attempt: well
// past the 300ms timeout of "low", so the limiter abandons it.
const stuckSleep = 1500 * time.Millisecond

// sleepPayload is the JSON payload of a typeSleep task.
type sleepPayload struct {
	SleepMS int `json:"sleep_ms"`
}

// taskBatch is a number of identical tasks to enqueue on one queue.
type taskBatch struct {
	queue       string
	description string
	task        *asynq.Task
	count       int
	opts        []asynq.Option
}

// enqueuedTask identifies a task of this run, so the summary can look up its
// final state in Redis.
type enqueuedTask struct {
	queue       string
	id          string
	description string
}

// workload returns the tasks to enqueue. With the budgets of exampleLimits,
// the slow tasks fill the caps of "default" (2) and "low" (1), so the tasks
// behind them are deferred.
func workload() []taskBatch {
	quick := sleepTask(5 * time.Millisecond)
	return []taskBatch{
		{queue: "low", description: "ignores its context", task: asynq.NewTask(typeStuck, nil), count: 1},
		{queue: "critical", description: "quick", task: quick, count: 12},
		// The slow tasks go first so that they hold both slots of "default"
		// while the quick ones arrive.
		{queue: "default", description: "slow", task: sleepTask(400 * time.Millisecond), count: 4},
		{queue: "default", description: "quick", task: quick, count: 6},
		// 4 KiB is over the 1024-byte MaxPayload of "default".
		{queue: "default", description: "oversized payload", task: asynq.NewTask(typeUpload, bytes.Repeat([]byte{'x'}, 4096)), count: 1},
		{queue: "low", description: "quick", task: quick, count: 1},
		// 200ms stays under the 300ms timeout of "low".
		{queue: "low", description: "slow", task: sleepTask(200 * time.Millisecond), count: 2},
		// With no retries left, a deferral would archive these tasks, so the
		// limiter makes them wait for room instead.
		{queue: "low", description: "quick, MaxRetry(0)", task: quick, count: 3, opts: []asynq.Option{asynq.MaxRetry(0)}},
	}
}

func sleepTask(d time.Duration) *asynq.Task {
	payload, err := json.Marshal(sleepPayload{SleepMS: int(d.Milliseconds())})
	if err != nil {
		panic(err) // sleepPayload always encodes
	}
	return asynq.NewTask(typeSleep, payload)
}

// enqueueWorkload enqueues every task of workload and returns them. Every
// task is kept in Redis for an hour after it completes, so its final state
// can be inspected.
func enqueueWorkload(ctx context.Context, client *asynq.Client) ([]enqueuedTask, error) {
	var tasks []enqueuedTask
	for _, batch := range workload() {
		opts := append([]asynq.Option{asynq.Queue(batch.queue), asynq.Retention(time.Hour)}, batch.opts...)
		for range batch.count {
			info, err := client.EnqueueContext(ctx, batch.task, opts...)
			if err != nil {
				return nil, fmt.Errorf("enqueue %s task (%s) on queue %q: %w", batch.task.Type(), batch.description, batch.queue, err)
			}
			tasks = append(tasks, enqueuedTask{queue: batch.queue, id: info.ID, description: batch.description})
		}
	}
	return tasks, nil
}

// newMux returns the handlers of the workload by task type.
func newMux() *asynq.ServeMux {
	mux := asynq.NewServeMux()
	mux.HandleFunc(typeSleep, handleSleep)
	mux.HandleFunc(typeStuck, handleStuck)
	mux.HandleFunc(typeUpload, handleUpload)
	return mux
}

func handleSleep(ctx context.Context, t *asynq.Task) error {
	var p sleepPayload
	if err := json.Unmarshal(t.Payload(), &p); err != nil {
		return fmt.Errorf("decode %s payload: %v: %w", t.Type(), err, asynq.SkipRetry)
	}

	timer := time.NewTimer(time.Duration(p.SleepMS) * time.Millisecond)
	defer timer.Stop()
	select {
	case <-timer.C:
		return nil
	case <-ctx.Done():
		return ctx.Err()
	}
}

// handleStuck simulates a handler that blocks without watching its context,
// as a call with no timeout of its own would. It blocks only on the first
// attempt, so the retry that follows the timeout succeeds.
func handleStuck(ctx context.Context, _ *asynq.Task) error {
	if retried, _ := asynq.GetRetryCount(ctx); retried == 0 {
		time.Sleep(stuckSleep)
	}
	return nil
}

// handleUpload simulates a handler that stores the payload. An oversized
// payload never reaches it, because the limiter archives the task first.
func handleUpload(context.Context, *asynq.Task) error {
	return nil
}
