//go:build linux

package asynqlimit

import (
	"bufio"
	"bytes"
	"context"
	"encoding/json"
	"fmt"
	"log/slog"
	"os"
	"os/exec"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/hibiken/asynq"
	"github.com/prometheus/client_golang/prometheus"

	"github.com/asynqlimit/asynqlimit/internal/resource"
)

// realPressureEnv marks the child process of TestRealMemoryPressure and
// carries its realPressureConfig as JSON.
const realPressureEnv = "ASYNQLIMIT_REAL_PRESSURE_CHILD"

// realPressureMarker starts the stdout line that carries the child's
// realPressureReport as JSON.
const realPressureMarker = "real-pressure-report: "

// Workload of TestRealMemoryPressure.
const (
	realPressureLowTasks      = 12
	realPressureCriticalTasks = 20
	// realPressureTaskBytes is what each low task maps and touches.
	realPressureTaskBytes = 60 << 20
	// realPressureHold is how long a low task holds its memory unless it is
	// preempted first.
	realPressureHold = 1500 * time.Millisecond
	// realPressureSoftAbove and realPressureHardAbove are the thresholds'
	// distances above the child's RSS at start: soft pressure needs three
	// low tasks resident, hard pressure five.
	realPressureSoftAbove = 150 << 20
	realPressureHardAbove = 300 << 20
	// realPressureSettleTimeout bounds the child's wait for every task to
	// complete, realPressureChildTimeout the whole child process.
	realPressureSettleTimeout = 50 * time.Second
	realPressureChildTimeout  = 90 * time.Second
)

// realPressureConfig is what the parent passes to the child.
type realPressureConfig struct {
	Addr          string `json:"addr"`
	DB            int    `json:"db"`
	LowTasks      int    `json:"low_tasks"`
	CriticalTasks int    `json:"critical_tasks"`
}

// realPressureRuns counts the handler runs of one task in the child.
type realPressureRuns struct {
	Queue string `json:"queue"`
	Runs  int    `json:"runs"`
	// Completed counts the runs that returned nil, Canceled those that
	// returned because the task's context ended.
	Completed int `json:"completed"`
	Canceled  int `json:"canceled"`
}

// realPressureReport is what the child prints as the last line of its
// stdout for the parent to check.
type realPressureReport struct {
	BaseRSS int64 `json:"base_rss"`
	Soft    int64 `json:"soft"`
	Hard    int64 `json:"hard"`
	// PeakRSS and MaxMemoryPressure are the highest values of
	// asynqlimit_process_resident_memory_bytes and
	// asynqlimit_pressure{resource="memory"} that the child read while it
	// waited, every 20ms.
	PeakRSS           int64   `json:"peak_rss"`
	MaxMemoryPressure float64 `json:"max_memory_pressure"`
	Settled           bool    `json:"settled"`
	Elapsed           string  `json:"elapsed"`
	// Runs maps task IDs to their handler runs.
	Runs          map[string]*realPressureRuns `json:"runs"`
	HandlerErrors []string                     `json:"handler_errors"`

	LowPressureDeferrals      float64 `json:"low_pressure_deferrals"`
	LowPreempted              float64 `json:"low_preempted"`
	LowPreemptions            float64 `json:"low_preemptions"`
	LowSucceeded              float64 `json:"low_succeeded"`
	CriticalPressureDeferrals float64 `json:"critical_pressure_deferrals"`
	CriticalPreempted         float64 `json:"critical_preempted"`
}

// TestRealMemoryPressure runs a worker with process limits in a child
// process, so that its RSS is its own, and floods it with low-priority tasks
// that hold real memory beside quick critical tasks. Soft pressure must shed
// low tasks and hard pressure must preempt some. Every task must complete
// exactly once without spending a retry, and a low task may run again only
// after a preemption.
func TestRealMemoryPressure(t *testing.T) {
	if testing.Short() {
		t.Skip("starts a child worker that maps about 500 MiB; skipped with -short")
	}
	// The worker runs in the child, so the parent needs only a database, a
	// client and an inspector. newHarness would also create an asynq server,
	// and a server that never starts never closes its Redis client, whose
	// goroutines goleak reports.
	db := testRedis.NewDB()
	redis := asynq.RedisClientOpt{Addr: testRedis.Addr, DB: db}
	h := &harness{t: t, redis: redis, client: asynq.NewClient(redis), insp: asynq.NewInspector(redis)}
	t.Cleanup(func() {
		h.client.Close()
		h.insp.Close()
		if err := testRedis.FlushDB(db); err != nil {
			t.Errorf("FlushDB(%d): %v", db, err)
		}
	})

	var lowIDs, criticalIDs []string
	for range realPressureLowTasks {
		lowIDs = append(lowIDs, h.enqueue("low", "hold", nil, asynq.MaxRetry(3)).ID)
	}

	config, err := json.Marshal(realPressureConfig{
		Addr: h.redis.Addr, DB: h.redis.DB,
		LowTasks: realPressureLowTasks, CriticalTasks: realPressureCriticalTasks,
	})
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithTimeout(context.Background(), realPressureChildTimeout)
	defer cancel()
	cmd := exec.CommandContext(ctx, os.Args[0], "-test.run=^TestRealMemoryPressureChild$",
		fmt.Sprintf("-test.timeout=%s", realPressureChildTimeout-5*time.Second))
	cmd.Env = append(os.Environ(), realPressureEnv+"="+string(config))
	cmd.WaitDelay = 5 * time.Second
	var stdout, stderr bytes.Buffer
	cmd.Stdout, cmd.Stderr = &stdout, &stderr
	if err := cmd.Start(); err != nil {
		t.Fatalf("start the child worker %s: %v", os.Args[0], err)
	}
	waited := false
	t.Cleanup(func() {
		if !waited { // a failed enqueue ended the test early
			cancel()
			_ = cmd.Wait()
		}
	})

	// Critical tasks arrive while the low tasks hold memory, so they run
	// under pressure.
	for range realPressureCriticalTasks {
		criticalIDs = append(criticalIDs, h.enqueue("critical", "quick", nil).ID)
		time.Sleep(100 * time.Millisecond)
	}
	waitErr := cmd.Wait()
	waited = true
	if ctx.Err() != nil {
		t.Fatalf("child worker killed after %s\nstdout:\n%s\nstderr:\n%s", realPressureChildTimeout, stdout.String(), stderr.String())
	}
	if waitErr != nil {
		t.Fatalf("child worker failed: %v\nstdout:\n%s\nstderr:\n%s", waitErr, stdout.String(), stderr.String())
	}
	report := parseRealPressureReport(t, stdout.String())
	t.Logf("child: base RSS %d MiB, soft %d MiB, hard %d MiB, peak RSS %d MiB, max memory pressure %v, settled in %s",
		report.BaseRSS>>20, report.Soft>>20, report.Hard>>20, report.PeakRSS>>20, report.MaxMemoryPressure, report.Elapsed)
	t.Logf("child: low pressure deferrals %v, preempted %v, preemptions %v, succeeded %v",
		report.LowPressureDeferrals, report.LowPreempted, report.LowPreemptions, report.LowSucceeded)
	defer func() {
		if t.Failed() {
			t.Logf("child stderr:\n%s", stderr.String())
		}
	}()

	if !report.Settled {
		t.Fatalf("child worker did not complete every task within %s", realPressureSettleTimeout)
	}
	if len(report.HandlerErrors) > 0 {
		t.Errorf("handler errors in the child: %q", report.HandlerErrors)
	}

	// Shedding: pressure deferrals beyond those that preemptions made.
	if report.LowPreempted <= 0 {
		t.Errorf("tasks_total{queue=low,outcome=preempted} = %v, want > 0 (peak RSS %d MiB, hard threshold %d MiB)",
			report.LowPreempted, report.PeakRSS>>20, report.Hard>>20)
	}
	if report.LowPressureDeferrals <= report.LowPreempted {
		t.Errorf("deferrals_total{queue=low,reason=pressure} = %v, want more than the %v preemptions, so that some were sheds",
			report.LowPressureDeferrals, report.LowPreempted)
	}
	if report.LowPreemptions < report.LowPreempted {
		t.Errorf("preemptions_total{queue=low} = %v, want >= the %v tasks with outcome preempted", report.LowPreemptions, report.LowPreempted)
	}
	if report.LowSucceeded != realPressureLowTasks {
		t.Errorf("tasks_total{queue=low,outcome=succeeded} = %v, want %d", report.LowSucceeded, realPressureLowTasks)
	}
	if report.CriticalPressureDeferrals != 0 {
		t.Errorf("deferrals_total{queue=critical,reason=pressure} = %v, want 0: the highest priority is never shed", report.CriticalPressureDeferrals)
	}
	if report.CriticalPreempted != 0 {
		t.Errorf("tasks_total{queue=critical,outcome=preempted} = %v, want 0", report.CriticalPreempted)
	}

	// Handler runs, as the child counted them.
	lowCompletions, canceledRuns := 0, 0
	for _, id := range lowIDs {
		runs := report.Runs[id]
		if runs == nil {
			t.Errorf("low task %s never ran", id)
			continue
		}
		lowCompletions += runs.Completed
		canceledRuns += runs.Canceled
		if runs.Completed != 1 {
			t.Errorf("low task %s completed %d times, want 1", id, runs.Completed)
		}
		if runs.Runs != runs.Completed+runs.Canceled {
			t.Errorf("low task %s ran %d times, want its %d completions plus its %d preempted runs",
				id, runs.Runs, runs.Completed, runs.Canceled)
		}
	}
	if lowCompletions != realPressureLowTasks {
		t.Errorf("low completions = %d, want %d", lowCompletions, realPressureLowTasks)
	}
	if float64(canceledRuns) != report.LowPreempted {
		t.Errorf("low runs ended by their context = %d, want the %v preempted", canceledRuns, report.LowPreempted)
	}
	for _, id := range criticalIDs {
		runs := report.Runs[id]
		if runs == nil {
			t.Errorf("critical task %s never ran", id)
			continue
		}
		if runs.Runs != 1 || runs.Completed != 1 {
			t.Errorf("critical task %s ran %d times and completed %d times, want 1 and 1", id, runs.Runs, runs.Completed)
		}
	}

	// asynq's view.
	for queue, ids := range map[string][]string{"low": lowIDs, "critical": criticalIDs} {
		info := h.queueInfo(queue)
		if info.Archived != 0 || info.Completed != len(ids) {
			t.Errorf("queue %s: %s; want %d completed and none archived", queue, queueCounts(info), len(ids))
		}
		for _, id := range ids {
			task := h.taskInfo(queue, id)
			if task.State != asynq.TaskStateCompleted {
				t.Errorf("task %s on %s is %v, want completed", id, queue, task.State)
			}
			if task.Retried != 0 {
				t.Errorf("task %s on %s has Retried = %d, want 0: deferrals and preemptions spend no retry", id, queue, task.Retried)
			}
		}
	}
}

// parseRealPressureReport returns the report in the child's stdout.
func parseRealPressureReport(t *testing.T, stdout string) *realPressureReport {
	t.Helper()
	scanner := bufio.NewScanner(strings.NewReader(stdout))
	scanner.Buffer(nil, 1<<20)
	for scanner.Scan() {
		line, found := strings.CutPrefix(scanner.Text(), realPressureMarker)
		if !found {
			continue
		}
		var report realPressureReport
		if err := json.Unmarshal([]byte(line), &report); err != nil {
			t.Fatalf("invalid report from the child: %v\n%s", err, line)
		}
		return &report
	}
	t.Fatalf("child stdout has no line starting with %q:\n%s", realPressureMarker, stdout)
	return nil
}

// TestRealMemoryPressureChild is the worker of TestRealMemoryPressure. It
// runs only in the child process that the parent starts.
func TestRealMemoryPressureChild(t *testing.T) {
	raw := os.Getenv(realPressureEnv)
	if raw == "" {
		t.Skip("runs only as the child process of TestRealMemoryPressure")
	}
	var config realPressureConfig
	if err := json.Unmarshal([]byte(raw), &config); err != nil {
		t.Fatalf("invalid %s: %v", realPressureEnv, err)
	}

	report := runRealPressureWorker(t, config)
	line, err := json.Marshal(report)
	if err != nil {
		t.Fatal(err)
	}
	fmt.Printf("%s%s\n", realPressureMarker, line)
}

// runRealPressureWorker runs the worker until every task of config is
// completed or archived, or realPressureSettleTimeout passes, and returns
// the report.
func runRealPressureWorker(t *testing.T, config realPressureConfig) *realPressureReport {
	sampler, err := resource.NewProcessSampler()
	if err != nil {
		t.Fatal(err)
	}
	base, err := sampler.Sample()
	if err != nil {
		t.Fatal(err)
	}
	report := &realPressureReport{
		BaseRSS: base.RSS,
		Soft:    base.RSS + realPressureSoftAbove,
		Hard:    base.RSS + realPressureHardAbove,
		Runs:    map[string]*realPressureRuns{},
	}

	limits := Limits{
		Queues: map[string]Budget{
			"critical": {Priority: 1},
			// TaskMemory is far below what a task really maps, as a
			// runaway task's estimate would be. Admission counts the
			// estimates of the tasks admitted since the last sample, so
			// it lets the first burst in, and only the samples of real
			// RSS see the pressure.
			"low": {Priority: 0, TaskMemory: 10 << 20, DeferDelay: 200 * time.Millisecond, MaxDeferDelay: time.Second},
		},
		Process: ProcessLimits{MemorySoft: report.Soft, MemoryHard: report.Hard, Grace: 100 * time.Millisecond},
	}
	redis := asynq.RedisClientOpt{Addr: config.Addr, DB: config.DB}
	reg := prometheus.NewRegistry()
	logger := slog.New(slog.NewTextHandler(os.Stderr, &slog.HandlerOptions{Level: slog.LevelWarn}))
	srv, err := NewServer(redis, asynq.Config{
		// Eight workers can take eight of the twelve low tasks at once
		// (480 MiB, so hard pressure) and leave four pending for shedding.
		Concurrency:              8,
		Queues:                   map[string]int{"critical": 3, "low": 1},
		TaskCheckInterval:        20 * time.Millisecond,
		DelayedTaskCheckInterval: 100 * time.Millisecond,
		ShutdownTimeout:          5 * time.Second,
		LogLevel:                 asynq.ErrorLevel,
	}, limits, WithRegisterer(reg), WithLogger(logger), WithSampleInterval(100*time.Millisecond),
		WithoutGate()) // sheds must be deferrals, which the dequeue gate would avoid
	if err != nil {
		t.Fatal(err)
	}

	var mu sync.Mutex
	record := func(ctx context.Context, err error) {
		id, _ := asynq.GetTaskID(ctx)
		queue, _ := asynq.GetQueueName(ctx)
		mu.Lock()
		defer mu.Unlock()
		runs := report.Runs[id]
		if runs == nil {
			runs = &realPressureRuns{Queue: queue}
			report.Runs[id] = runs
		}
		runs.Runs++
		switch {
		case err == nil:
			runs.Completed++
		case ctx.Err() != nil:
			runs.Canceled++
		default:
			report.HandlerErrors = append(report.HandlerErrors, fmt.Sprintf("task %s on %s: %v", id, queue, err))
		}
	}
	mux := asynq.NewServeMux()
	mux.HandleFunc("hold", func(ctx context.Context, _ *asynq.Task) error {
		err := holdMappedMemory(ctx, realPressureTaskBytes, realPressureHold)
		record(ctx, err)
		return err
	})
	mux.HandleFunc("quick", func(ctx context.Context, _ *asynq.Task) error {
		record(ctx, nil)
		return nil
	})

	start := time.Now()
	if err := srv.Start(mux); err != nil {
		t.Fatal(err)
	}
	insp := asynq.NewInspector(redis)
	report.Settled = waitRealPressureSettled(insp, reg, config, report)
	report.Elapsed = time.Since(start).Round(time.Millisecond).String()
	srv.Shutdown()
	if err := insp.Close(); err != nil {
		t.Errorf("close inspector: %v", err)
	}

	report.LowPressureDeferrals = gatheredValue(t, reg, "asynqlimit_deferrals_total", "queue", "low", "reason", "pressure")
	report.LowPreempted = gatheredValue(t, reg, "asynqlimit_tasks_total", "queue", "low", "outcome", "preempted")
	report.LowPreemptions = gatheredValue(t, reg, "asynqlimit_preemptions_total", "queue", "low")
	report.LowSucceeded = gatheredValue(t, reg, "asynqlimit_tasks_total", "queue", "low", "outcome", "succeeded")
	report.CriticalPressureDeferrals = gatheredValue(t, reg, "asynqlimit_deferrals_total", "queue", "critical", "reason", "pressure")
	report.CriticalPreempted = gatheredValue(t, reg, "asynqlimit_tasks_total", "queue", "critical", "outcome", "preempted")
	return report
}

// waitRealPressureSettled polls until every task of config is completed or
// archived, and records the peak RSS and pressure that the Limiter reports
// meanwhile. It returns false after realPressureSettleTimeout.
func waitRealPressureSettled(insp *asynq.Inspector, reg *prometheus.Registry, config realPressureConfig, report *realPressureReport) bool {
	settled := func(queue string, want int) bool {
		info, err := insp.GetQueueInfo(queue)
		// The critical queue does not exist until the parent enqueues its
		// first task.
		return err == nil && info.Size == want && info.Completed+info.Archived == want && info.Active == 0
	}
	deadline := time.Now().Add(realPressureSettleTimeout)
	for time.Now().Before(deadline) {
		if rss, ok := gatheredSum(reg, "asynqlimit_process_resident_memory_bytes"); ok {
			report.PeakRSS = max(report.PeakRSS, int64(rss))
		}
		if level, ok := gatheredSum(reg, "asynqlimit_pressure", "resource", "memory"); ok {
			report.MaxMemoryPressure = max(report.MaxMemoryPressure, level)
		}
		if settled("low", config.LowTasks) && settled("critical", config.CriticalTasks) {
			return true
		}
		time.Sleep(20 * time.Millisecond)
	}
	return false
}

// holdMappedMemory maps size bytes, touches every page so that they are
// resident, and holds them for hold or until ctx ends. It returns ctx.Err()
// in that case.
//
// The memory is mapped outside the Go heap so that RSS rises and falls with
// the task. Memory of the Go heap stays resident until a garbage collection
// and the scavenger release it. Under -race, the race detector's shadow
// memory of the heap stays resident even after that: with Go 1.26, 60 MiB
// touched and freed with debug.FreeOSMemory left 60 MiB of RSS.
func holdMappedMemory(ctx context.Context, size int, hold time.Duration) error {
	mem, err := syscall.Mmap(-1, 0, size, syscall.PROT_READ|syscall.PROT_WRITE, syscall.MAP_ANON|syscall.MAP_PRIVATE)
	if err != nil {
		return fmt.Errorf("mmap %d bytes: %w", size, err)
	}
	defer func() {
		if err := syscall.Munmap(mem); err != nil {
			panic(fmt.Sprintf("munmap %d bytes: %v", size, err))
		}
	}()

	page := os.Getpagesize()
	for i := 0; i < len(mem); i += page {
		if i%(1<<20) == 0 && ctx.Err() != nil {
			return ctx.Err()
		}
		mem[i] = 1
	}
	timer := time.NewTimer(hold)
	defer timer.Stop()
	select {
	case <-ctx.Done():
		return ctx.Err()
	case <-timer.C:
		return nil
	}
}

// gatheredValue returns the sum of the series of the metric name whose
// labels include labelPairs (name, value, name, value...).
func gatheredValue(t *testing.T, reg *prometheus.Registry, name string, labelPairs ...string) float64 {
	t.Helper()
	value, found := gatheredSum(reg, name, labelPairs...)
	if !found {
		t.Errorf("metric %s%q not found in the registry", name, labelPairs)
	}
	return value
}

// gatheredSum returns the sum of the counter and gauge series of the
// metric name whose labels include labelPairs, and whether any series
// matched.
func gatheredSum(reg *prometheus.Registry, name string, labelPairs ...string) (float64, bool) {
	families, err := reg.Gather()
	if err != nil {
		return 0, false
	}
	sum, found := 0.0, false
	for _, family := range families {
		if family.GetName() != name {
			continue
		}
		for _, metric := range family.GetMetric() {
			labels := map[string]string{}
			for _, label := range metric.GetLabel() {
				labels[label.GetName()] = label.GetValue()
			}
			matches := true
			for i := 0; i+1 < len(labelPairs); i += 2 {
				matches = matches && labels[labelPairs[i]] == labelPairs[i+1]
			}
			if !matches {
				continue
			}
			found = true
			sum += metric.GetCounter().GetValue() + metric.GetGauge().GetValue()
		}
	}
	return sum, found
}
