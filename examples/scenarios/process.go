package main

import (
	"bufio"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"os"
	"os/exec"
	"os/signal"
	"sync"
	"syscall"
	"time"

	"github.com/hibiken/asynq"
	"github.com/prometheus/client_golang/prometheus"
	"github.com/shirou/gopsutil/v4/process"
)

const (
	// rssSampleInterval is how often the parent reads a worker's RSS.
	rssSampleInterval = 50 * time.Millisecond
	// maxWorkerRSS is the RSS at which the parent kills a worker, so that a
	// run cannot take the machine's memory.
	maxWorkerRSS = 2 << 30
	// readyTimeout bounds the start of a worker process, stopTimeout its
	// exit after its stdin is closed.
	readyTimeout = 30 * time.Second
	stopTimeout  = 30 * time.Second
	// readyLine is the stdout line a worker writes once it processes tasks.
	readyLine = "ready"
)

// workerSpec is the value of the hidden -worker flag.
type workerSpec struct {
	Scenario  string `json:"scenario"`
	Variant   string `json:"variant"`
	RedisAddr string `json:"redis_addr"`
	DB        int    `json:"db"`
	LogLevel  string `json:"log_level"`
}

// workerReport is the last line that a worker process writes to stdout.
type workerReport struct {
	// CriticalLatencies are the enqueue-to-start latencies of the critical
	// tasks that started, in the order they started.
	CriticalLatencies []time.Duration `json:"critical_latencies"`
	// Counters holds every asynqlimit_*_total series of the worker's
	// registry, keyed by name and labels, such as
	// asynqlimit_preemptions_total{queue="low"}. It is empty for a worker
	// without the library.
	Counters map[string]float64 `json:"counters"`
}

// variantResult holds the measurements of one run of a scenario's variant.
type variantResult struct {
	variant string
	// peakRSS is the highest RSS of the worker process that the parent read.
	peakRSS int64
	// aborted is the reason the run was cut short, or empty.
	aborted  string
	report   workerReport
	enqueued map[string]int
	// queues holds asynq's counts of each queue after the run.
	queues map[string]*asynq.QueueInfo
}

// loadFunc enqueues a scenario's workload with client until ctx ends and
// returns the number of tasks it enqueued per queue.
type loadFunc func(ctx context.Context, client *asynq.Client) (map[string]int, error)

// runVariant runs one variant of a scenario in a fresh worker process on a
// Redis database of its own. It starts the worker and runs load for
// env.duration while it samples the worker's RSS. Then it stops the worker
// and reads its report and asynq's queue counts.
func runVariant(ctx context.Context, env *environment, scenarioName, variant string, load loadFunc) (*variantResult, error) {
	redis := asynq.RedisClientOpt{Addr: env.redisAddr, DB: env.nextDB}
	env.nextDB++
	inspector := asynq.NewInspector(redis)
	defer inspector.Close()
	if queues, err := inspector.Queues(); err != nil {
		return nil, fmt.Errorf("list the queues of Redis database %d at %s: %w", redis.DB, redis.Addr, err)
	} else if len(queues) > 0 {
		return nil, fmt.Errorf("Redis database %d at %s already has the asynq queues %q; point REDIS_ADDR at a scratch server, "+
			"or unset it to use the embedded miniredis", redis.DB, redis.Addr, queues)
	}

	spec := workerSpec{Scenario: scenarioName, Variant: variant, RedisAddr: redis.Addr, DB: redis.DB, LogLevel: env.logLevel.String()}
	worker, err := startWorker(spec)
	if err != nil {
		return nil, err
	}
	defer worker.kill()
	fmt.Fprintf(os.Stderr, "scenarios: %s, variant %s: worker process %d started on Redis database %d\n",
		scenarioName, variant, worker.cmd.Process.Pid, redis.DB)

	select {
	case <-worker.ready:
	case <-worker.exited:
		return nil, fmt.Errorf("worker process of variant %s exited before it was ready: %v", variant, worker.waitErr)
	case <-time.After(readyTimeout):
		return nil, fmt.Errorf("worker process of variant %s was not ready within %s", variant, readyTimeout)
	case <-ctx.Done():
		return nil, ctx.Err()
	}

	client := asynq.NewClient(redis)
	defer client.Close()
	loadCtx, cancel := context.WithTimeout(ctx, env.duration)
	defer cancel()
	go func() {
		// A worker killed for its RSS ends the load early.
		select {
		case <-worker.exited:
			cancel()
		case <-loadCtx.Done():
		}
	}()
	enqueued, err := load(loadCtx, client)
	if err != nil {
		return nil, fmt.Errorf("enqueue the load of variant %s: %w", variant, err)
	}
	if ctx.Err() != nil {
		return nil, ctx.Err()
	}

	result := &variantResult{variant: variant, enqueued: enqueued, queues: map[string]*asynq.QueueInfo{}}
	report, err := worker.stop()
	result.peakRSS = worker.peakRSS()
	result.aborted = worker.abortReason()
	if err != nil && result.aborted == "" {
		return nil, fmt.Errorf("worker process of variant %s: %w", variant, err)
	}
	if report != nil {
		result.report = *report
	}

	for queue := range enqueued {
		info, err := inspector.GetQueueInfo(queue)
		if err != nil {
			return nil, fmt.Errorf("read queue %s of variant %s: %w", queue, variant, err)
		}
		result.queues[queue] = info
		// NOTE: a queue with active tasks, left by a killed worker, stays,
		// because asynq v0.26 deletes no queue with active tasks, even with
		// force.
		if err := inspector.DeleteQueue(queue, true); err != nil {
			fmt.Fprintf(os.Stderr, "scenarios: delete queue %s of Redis database %d: %v\n", queue, redis.DB, err)
		}
	}
	return result, nil
}

// workerHandle is a worker process seen from the parent.
type workerHandle struct {
	cmd   *exec.Cmd
	stdin io.WriteCloser
	// ready is closed when the worker writes readyLine, and exited when the
	// process has exited. waitErr is set before exited is closed.
	ready   chan struct{}
	exited  chan struct{}
	waitErr error

	mu      sync.Mutex
	lastOut string
	peak    int64
	aborted string
}

// startWorker starts this program as the worker process of spec, and
// samples its RSS until it exits.
func startWorker(spec workerSpec) (*workerHandle, error) {
	exe, err := os.Executable()
	if err != nil {
		return nil, fmt.Errorf("find this program's path to start a worker process: %w", err)
	}
	specJSON, err := json.Marshal(spec)
	if err != nil {
		return nil, err
	}
	cmd := exec.Command(exe, "-"+workerFlag, string(specJSON))
	cmd.Stderr = os.Stderr
	stdin, err := cmd.StdinPipe()
	if err != nil {
		return nil, err
	}
	stdout, err := cmd.StdoutPipe()
	if err != nil {
		return nil, err
	}
	if err := cmd.Start(); err != nil {
		return nil, fmt.Errorf("start worker process %s: %w", exe, err)
	}

	w := &workerHandle{cmd: cmd, stdin: stdin, ready: make(chan struct{}), exited: make(chan struct{})}
	go w.readStdout(stdout)
	go w.sampleRSS()
	return w, nil
}

// readStdout closes w.ready at readyLine, keeps the last line, and waits
// for the process once its stdout ends.
func (w *workerHandle) readStdout(stdout io.Reader) {
	scanner := bufio.NewScanner(stdout)
	scanner.Buffer(nil, 16<<20)
	readyClosed := false
	for scanner.Scan() {
		line := scanner.Text()
		if line == readyLine && !readyClosed {
			close(w.ready)
			readyClosed = true
			continue
		}
		w.mu.Lock()
		w.lastOut = line
		w.mu.Unlock()
	}
	w.waitErr = w.cmd.Wait()
	close(w.exited)
}

// sampleRSS records the peak RSS of the worker until it exits, and kills it
// if its RSS passes maxWorkerRSS.
func (w *workerHandle) sampleRSS() {
	proc, err := process.NewProcess(int32(w.cmd.Process.Pid))
	if err != nil {
		w.abort(fmt.Sprintf("cannot sample the RSS of worker process %d: %v", w.cmd.Process.Pid, err))
		return
	}
	ticker := time.NewTicker(rssSampleInterval)
	defer ticker.Stop()
	for {
		select {
		case <-w.exited:
			return
		case <-ticker.C:
		}
		memory, err := proc.MemoryInfo()
		if err != nil {
			continue // the process has exited, and w.exited closes soon
		}
		rss := int64(memory.RSS)
		w.mu.Lock()
		w.peak = max(w.peak, rss)
		w.mu.Unlock()
		if rss > maxWorkerRSS {
			w.abort(fmt.Sprintf("killed at %d MiB of RSS, over the %d MiB cap of a run", rss>>20, maxWorkerRSS>>20))
			return
		}
	}
}

// abort records why the run ends early and kills the worker.
func (w *workerHandle) abort(reason string) {
	w.mu.Lock()
	if w.aborted == "" {
		w.aborted = reason
	}
	w.mu.Unlock()
	w.kill()
}

func (w *workerHandle) kill() {
	if err := w.cmd.Process.Kill(); err != nil && !errors.Is(err, os.ErrProcessDone) {
		fmt.Fprintf(os.Stderr, "scenarios: kill worker process %d: %v\n", w.cmd.Process.Pid, err)
	}
}

// stop closes the worker's stdin, which makes it shut down, and returns the
// report that it writes before it exits. It kills the worker after
// stopTimeout.
func (w *workerHandle) stop() (*workerReport, error) {
	w.stdin.Close()
	select {
	case <-w.exited:
	case <-time.After(stopTimeout):
		w.kill()
		<-w.exited
		return nil, fmt.Errorf("worker process %d did not exit within %s of its stdin closing, so it was killed", w.cmd.Process.Pid, stopTimeout)
	}
	if w.waitErr != nil {
		return nil, fmt.Errorf("worker process %d failed: %w", w.cmd.Process.Pid, w.waitErr)
	}
	w.mu.Lock()
	line := w.lastOut
	w.mu.Unlock()
	var report workerReport
	if err := json.Unmarshal([]byte(line), &report); err != nil {
		return nil, fmt.Errorf("invalid report from worker process %d: %w: %q", w.cmd.Process.Pid, err, line)
	}
	return &report, nil
}

func (w *workerHandle) peakRSS() int64 {
	w.mu.Lock()
	defer w.mu.Unlock()
	return w.peak
}

func (w *workerHandle) abortReason() string {
	w.mu.Lock()
	defer w.mu.Unlock()
	return w.aborted
}

// workerRun holds the inputs of a scenario's worker function in the worker
// process.
type workerRun struct {
	variant string
	redis   asynq.RedisClientOpt
	logger  *slog.Logger
	// registry receives the metrics of a worker with the library, and the
	// report copies their counters.
	registry  *prometheus.Registry
	latencies *latencyRecorder
}

// runWorkerProcess runs the worker of specJSON until its stdin is closed or
// it receives SIGINT or SIGTERM, then shuts it down and writes its report
// to stdout.
func runWorkerProcess(specJSON string) error {
	var spec workerSpec
	if err := json.Unmarshal([]byte(specJSON), &spec); err != nil {
		return fmt.Errorf("invalid -%s value: %w", workerFlag, err)
	}
	sc, ok := scenarios[spec.Scenario]
	if !ok {
		return fmt.Errorf("unknown scenario %q in -%s", spec.Scenario, workerFlag)
	}
	var level slog.Level
	if err := level.UnmarshalText([]byte(spec.LogLevel)); err != nil {
		return fmt.Errorf("invalid log level %q in -%s: %w", spec.LogLevel, workerFlag, err)
	}
	logger := slog.New(slog.NewTextHandler(os.Stderr, &slog.HandlerOptions{Level: level})).
		With("scenario", spec.Scenario, "variant", spec.Variant)

	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	defer stop()
	go func() {
		// The parent closes stdin to stop the worker, and stdin also closes
		// when the parent dies.
		_, _ = io.Copy(io.Discard, os.Stdin)
		stop()
	}()

	run := &workerRun{
		variant:   spec.Variant,
		redis:     asynq.RedisClientOpt{Addr: spec.RedisAddr, DB: spec.DB},
		logger:    logger,
		registry:  prometheus.NewRegistry(),
		latencies: &latencyRecorder{},
	}
	srv, handler, err := sc.worker(run)
	if err != nil {
		return err
	}
	if err := srv.Start(handler); err != nil {
		return fmt.Errorf("start worker: %w", err)
	}
	fmt.Println(readyLine)
	logger.Info("worker started", "redis", spec.RedisAddr, "db", spec.DB)

	<-ctx.Done()
	srv.Shutdown()
	logger.Info("worker stopped")
	report := workerReport{CriticalLatencies: run.latencies.all(), Counters: gatherCounters(run.registry)}
	return json.NewEncoder(os.Stdout).Encode(report)
}
