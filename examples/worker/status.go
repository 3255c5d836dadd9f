package main

import (
	"context"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"slices"
	"text/tabwriter"
	"time"

	"github.com/hibiken/asynq"
	"github.com/prometheus/client_golang/prometheus"
)

// Names of the limiter metrics that the status lines read.
const (
	metricInFlight    = "asynqlimit_tasks_in_flight"
	metricLimit       = "asynqlimit_queue_concurrency_limit"
	metricTasks       = "asynqlimit_tasks_total"
	metricAbandoned   = "asynqlimit_abandoned_tasks"
	metricWaits       = "asynqlimit_waits_total"
	metricGateSkips   = "asynqlimit_gate_skips_total"
	labelQueue        = "queue"
	labelOutcome      = "outcome"
	statusInterval    = time.Second
	elapsedResolution = 100 * time.Millisecond
)

// limiterCounts is one reading of the limiter metrics of one queue.
type limiterCounts struct {
	inFlight  int
	limit     int
	abandoned int
	waited    int
	// skipped counts the dequeues that the gate skipped because the queue
	// was full.
	skipped int
	// outcomes maps the outcome label of asynqlimit_tasks_total, such as
	// "succeeded" or "deferred", to its count.
	outcomes map[string]int
}

// readLimiterCounts gathers g and returns the limiter metrics by queue label.
// When some collector fails, it returns the counts it could read along with
// the error.
func readLimiterCounts(g prometheus.Gatherer) (map[string]*limiterCounts, error) {
	families, err := g.Gather()
	counts := make(map[string]*limiterCounts)
	for _, family := range families {
		for _, m := range family.GetMetric() {
			var queue, outcome string
			for _, label := range m.GetLabel() {
				switch label.GetName() {
				case labelQueue:
					queue = label.GetValue()
				case labelOutcome:
					outcome = label.GetValue()
				}
			}
			c := counts[queue]
			if c == nil {
				c = &limiterCounts{outcomes: make(map[string]int)}
			}

			switch family.GetName() {
			case metricInFlight:
				c.inFlight = int(m.GetGauge().GetValue())
			case metricLimit:
				c.limit = int(m.GetGauge().GetValue())
			case metricAbandoned:
				c.abandoned = int(m.GetGauge().GetValue())
			case metricWaits:
				c.waited = int(m.GetCounter().GetValue())
			case metricGateSkips:
				c.skipped = int(m.GetCounter().GetValue())
			case metricTasks:
				c.outcomes[outcome] = int(m.GetCounter().GetValue())
			default:
				continue
			}
			counts[queue] = c
		}
	}
	return counts, err
}

// printStatusUntilDone prints the status lines every statusInterval until
// ctx ends.
func printStatusUntilDone(ctx context.Context, w io.Writer, g prometheus.Gatherer, start time.Time, logger *slog.Logger) {
	ticker := time.NewTicker(statusInterval)
	defer ticker.Stop()
	for {
		select {
		case <-ctx.Done():
			return
		case <-ticker.C:
			printStatus(w, g, time.Since(start), logger)
		}
	}
}

// printStatus prints one line per queue, such as
//
//	t=3s    queue=low      in_flight=0/1  succeeded=3   skipped=40   deferred=0   rejected=0  timed_out=1  abandoned=0  waited=0
func printStatus(w io.Writer, g prometheus.Gatherer, elapsed time.Duration, logger *slog.Logger) {
	counts, err := readLimiterCounts(g)
	if err != nil {
		logger.Warn("gather metrics for the status line", "error", err)
	}

	elapsedLabel := "t=" + elapsed.Round(elapsedResolution).String()
	for _, queue := range queueOrder() {
		c := counts[queue]
		if c == nil {
			fmt.Fprintf(w, "%-7s queue=%-8s no limiter metrics\n", elapsedLabel, queue)
			continue
		}
		fmt.Fprintf(w, "%-7s queue=%-8s in_flight=%d/%d  succeeded=%-3d skipped=%-4d deferred=%-3d rejected=%-2d timed_out=%-2d abandoned=%-2d waited=%d\n",
			elapsedLabel, queue, c.inFlight, c.limit, c.outcomes["succeeded"], c.skipped, c.outcomes["deferred"],
			c.outcomes["rejected"], c.outcomes["timed_out"], c.abandoned, c.waited)
	}
}

// taskStates are the asynq task states that the summary has columns for, in
// column order.
var taskStates = []asynq.TaskState{
	asynq.TaskStateCompleted,
	asynq.TaskStateArchived,
	asynq.TaskStateRetry,
	asynq.TaskStatePending,
	asynq.TaskStateActive,
	asynq.TaskStateScheduled,
}

// stateMissing counts tasks that Redis no longer has, which would mean a lost
// task: with Retention(time.Hour) a completed task stays for an hour.
const stateMissing = "missing"

// printSummary prints, for each queue, the final asynq state of the tasks of
// this run next to the limiter's counts, then every archived task with its
// error, then whether every task finished.
func printSummary(w io.Writer, g prometheus.Gatherer, inspector *asynq.Inspector, tasks []enqueuedTask, logger *slog.Logger) error {
	enqueued := make(map[string]int)
	states := make(map[string]map[string]int)
	var archived []*asynq.TaskInfo
	var archivedTasks []enqueuedTask
	for _, task := range tasks {
		enqueued[task.queue]++
		if states[task.queue] == nil {
			states[task.queue] = make(map[string]int)
		}

		info, err := inspector.GetTaskInfo(task.queue, task.id)
		if errors.Is(err, asynq.ErrTaskNotFound) {
			states[task.queue][stateMissing]++
			continue
		}
		if err != nil {
			return fmt.Errorf("read state of task %s on queue %q: %w", task.id, task.queue, err)
		}
		states[task.queue][info.State.String()]++
		if info.State == asynq.TaskStateArchived {
			archived = append(archived, info)
			archivedTasks = append(archivedTasks, task)
		}
	}

	counts, err := readLimiterCounts(g)
	if err != nil {
		logger.Warn("gather metrics for the summary", "error", err)
	}

	fmt.Fprintln(w)
	fmt.Fprintln(w, "summary: asynq states of this run's tasks (read with asynq.Inspector), then limiter counts (from the registry)")
	tw := tabwriter.NewWriter(w, 0, 0, 2, ' ', 0)
	fmt.Fprint(tw, "queue\tenqueued")
	for _, s := range taskStates {
		fmt.Fprintf(tw, "\t%s", s)
	}
	fmt.Fprintln(tw, "\tmissing\t| succeeded\tfailed\tdeferred\trejected\ttimed_out\twaited")
	for _, queue := range queueOrder() {
		fmt.Fprintf(tw, "%s\t%d", queue, enqueued[queue])
		for _, s := range taskStates {
			fmt.Fprintf(tw, "\t%d", states[queue][s.String()])
		}
		c := counts[queue]
		if c == nil {
			c = &limiterCounts{outcomes: map[string]int{}}
		}
		fmt.Fprintf(tw, "\t%d\t| %d\t%d\t%d\t%d\t%d\t%d\n", states[queue][stateMissing],
			c.outcomes["succeeded"], c.outcomes["failed"], c.outcomes["deferred"],
			c.outcomes["rejected"], c.outcomes["timed_out"], c.waited)
	}
	if err := tw.Flush(); err != nil {
		return fmt.Errorf("write summary: %w", err)
	}

	for i, info := range archived {
		fmt.Fprintf(w, "archived: queue=%s task_id=%s type=%s (%s): %s\n",
			info.Queue, info.ID, info.Type, archivedTasks[i].description, info.LastErr)
	}
	printVerdict(w, len(tasks), states)
	return nil
}

// printVerdict prints whether every task of the run completed or was
// archived.
func printVerdict(w io.Writer, total int, states map[string]map[string]int) {
	var completed, archived, missing int
	for _, byState := range states {
		completed += byState[asynq.TaskStateCompleted.String()]
		archived += byState[asynq.TaskStateArchived.String()]
		missing += byState[stateMissing]
	}

	unfinished := total - completed - archived - missing
	switch {
	case missing > 0:
		fmt.Fprintf(w, "LOST: %d of %d tasks are no longer in Redis\n", missing, total)
	case unfinished > 0:
		fmt.Fprintf(w, "%d of %d tasks have not finished yet (retry, pending, active or scheduled); run longer, for example -duration 20s\n",
			unfinished, total)
	default:
		fmt.Fprintf(w, "all %d tasks finished: %d completed, %d archived\n", total, completed, archived)
	}
}

// queueOrder returns the configured queues from the highest priority to the
// lowest.
func queueOrder() []string {
	limits := exampleLimits()
	names := make([]string, 0, len(limits.Queues))
	for name := range limits.Queues {
		names = append(names, name)
	}
	slices.SortFunc(names, func(a, b string) int {
		return limits.Queues[b].Priority - limits.Queues[a].Priority
	})
	return names
}
