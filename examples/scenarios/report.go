package main

import (
	"context"
	"encoding/json"
	"fmt"
	"io"
	"math"
	"slices"
	"sort"
	"strings"
	"sync"
	"text/tabwriter"
	"time"

	"github.com/hibiken/asynq"
	"github.com/prometheus/client_golang/prometheus"
)

// criticalPayload is the payload of a critical task: the time the parent
// enqueued it, read by the worker to measure the task's latency.
type criticalPayload struct {
	EnqueuedAt time.Time `json:"enqueued_at"`
}

// newCriticalTask returns a critical task of type typ stamped with now.
func newCriticalTask(typ string, now time.Time) (*asynq.Task, error) {
	payload, err := json.Marshal(criticalPayload{EnqueuedAt: now})
	if err != nil {
		return nil, err
	}
	return asynq.NewTask(typ, payload), nil
}

// latencyRecorder records the enqueue-to-start latency of critical tasks in
// the worker process. Parent and worker run on one machine, so they read
// the same wall clock.
type latencyRecorder struct {
	mu        sync.Mutex
	latencies []time.Duration
}

// ProcessTask records the latency of a critical task and returns at once.
func (r *latencyRecorder) ProcessTask(_ context.Context, t *asynq.Task) error {
	started := time.Now()
	var payload criticalPayload
	if err := json.Unmarshal(t.Payload(), &payload); err != nil {
		return fmt.Errorf("invalid critical task payload %q: %v: %w", t.Payload(), err, asynq.SkipRetry)
	}
	r.mu.Lock()
	r.latencies = append(r.latencies, started.Sub(payload.EnqueuedAt))
	r.mu.Unlock()
	return nil
}

func (r *latencyRecorder) all() []time.Duration {
	r.mu.Lock()
	defer r.mu.Unlock()
	return slices.Clone(r.latencies)
}

// gatherCounters returns every counter series of reg whose name ends in
// _total, keyed by name and labels as in name{label="value"}.
func gatherCounters(reg *prometheus.Registry) map[string]float64 {
	counters := map[string]float64{}
	families, err := reg.Gather()
	if err != nil {
		// Gather returns what it could read along with the error.
		counters["gather_errors"] = 1
	}
	for _, family := range families {
		if !strings.HasSuffix(family.GetName(), "_total") {
			continue
		}
		for _, metric := range family.GetMetric() {
			var labels []string
			for _, label := range metric.GetLabel() {
				labels = append(labels, fmt.Sprintf("%s=%q", label.GetName(), label.GetValue()))
			}
			key := family.GetName() + "{" + strings.Join(labels, ",") + "}"
			counters[key] = metric.GetCounter().GetValue()
		}
	}
	return counters
}

// percentile returns the nearest-rank percentile p (0 to 100) of
// latencies, or -1 when there are none.
func percentile(latencies []time.Duration, p float64) time.Duration {
	if len(latencies) == 0 {
		return -1
	}
	sorted := slices.Clone(latencies)
	slices.Sort(sorted)
	rank := int(math.Ceil(p / 100 * float64(len(sorted))))
	return sorted[max(rank-1, 0)]
}

// tableQueues names the queues that printResults reports.
type tableQueues struct {
	critical, low string
}

// printResults prints one row per run: peak RSS against the hard threshold,
// critical latency, and what became of the low-priority tasks.
func printResults(w io.Writer, results []*variantResult, hard int64, queues tableQueues) {
	tw := tabwriter.NewWriter(w, 0, 0, 2, ' ', 0)
	fmt.Fprintln(tw, "run\tpeak RSS MiB\thard MiB\tpeak/hard\tcritical p50\tcritical p99\tcritical started\tlow completed\tlow archived\t")
	for _, r := range results {
		latencies := r.report.CriticalLatencies
		fmt.Fprintf(tw, "%s\t%d\t%d\t%.2f\t%s\t%s\t%d/%d\t%s\t%s\t\n",
			r.variant, r.peakRSS>>20, hard>>20, float64(r.peakRSS)/float64(hard),
			formatLatency(percentile(latencies, 50)), formatLatency(percentile(latencies, 99)),
			len(latencies), r.enqueued[queues.critical],
			queueCount(r, queues.low, func(q *asynq.QueueInfo) int { return q.Completed }),
			queueCount(r, queues.low, func(q *asynq.QueueInfo) int { return q.Archived }))
	}
	tw.Flush()

	for _, r := range results {
		if r.aborted != "" {
			fmt.Fprintf(w, "%s: run cut short: %s\n", r.variant, r.aborted)
		}
		keys := make([]string, 0, len(r.report.Counters))
		for key, value := range r.report.Counters {
			if value != 0 {
				keys = append(keys, key)
			}
		}
		sort.Strings(keys)
		for _, key := range keys {
			fmt.Fprintf(w, "%s: %s %v\n", r.variant, key, r.report.Counters[key])
		}
	}
}

// queueCount returns one count of asynq's view of queue after run r, with
// the number enqueued, or "n/a" when the queue was not read.
func queueCount(r *variantResult, queue string, count func(*asynq.QueueInfo) int) string {
	info, ok := r.queues[queue]
	if !ok {
		return "n/a"
	}
	return fmt.Sprintf("%d/%d", count(info), r.enqueued[queue])
}

func formatLatency(d time.Duration) string {
	if d < 0 {
		return "n/a"
	}
	return fmt.Sprintf("%.1fms", float64(d)/float64(time.Millisecond))
}
