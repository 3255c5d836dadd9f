package main

import (
	"context"
	"encoding/json"
	"fmt"
	"io"
	"math/rand/v2"
	"os"
	"runtime"
	"slices"
	"sort"
	"sync/atomic"
	"text/tabwriter"
	"time"

	"github.com/hibiken/asynq"
	"github.com/shirou/gopsutil/v4/process"

	"github.com/asynqlimit/asynqlimit"
)

// Workload and limits of the cpu-hog scenario.
const (
	// cpuHogMinWork and cpuHogMaxWork bound the CPU time that one hog task
	// spins, drawn uniformly for each task. cpuHogShortWork is the CPU time
	// of one short task. All three are converted to loop iterations with
	// the rate that measureSpinRate measures in the parent.
	cpuHogMinWork   = 200 * time.Millisecond
	cpuHogMaxWork   = 500 * time.Millisecond
	cpuHogShortWork = 2 * time.Millisecond
	// cpuHogEvery and cpuHogShortEvery are the intervals at which the
	// parent enqueues hog and short tasks. Twenty hog tasks a second of
	// 350 ms on average ask for 7 cores, so the hog queue always has a
	// backlog.
	cpuHogEvery      = 50 * time.Millisecond
	cpuHogShortEvery = 50 * time.Millisecond
	// cpuHogConcurrency is asynq's Concurrency in both runs: enough hog
	// handlers to keep every core of a small machine busy.
	cpuHogConcurrency = 8

	// cpuHogBudget is the hog queue's Budget.CPU in cores in the run with
	// the library, averaged over asynqlimit.DefaultCPUWindow.
	cpuHogBudget = 0.5
	// cpuHogSampleInterval is the library's WithSampleInterval, how often
	// it updates each queue's CPU use. Shorter than the default 250 ms, it
	// closes the hog queue sooner once the queue passes its budget.
	cpuHogSampleInterval = 50 * time.Millisecond

	// cpuHogCPUSampleInterval is how often the parent reads the worker
	// process's CPU time during the load.
	cpuHogCPUSampleInterval = 250 * time.Millisecond
	// cpuHogDrainTimeout bounds the wait, after the load, for the short
	// tasks still pending or active to finish.
	cpuHogDrainTimeout = 30 * time.Second
)

// Queue names and task types of the cpu-hog scenario.
const (
	cpuHogShortQueue = "short"
	cpuHogQueue      = "hog"
	cpuHogShortType  = "short:spin"
	cpuHogType       = "hog:spin"
)

var cpuHog = scenario{
	summary: "hog tasks that each spin 200-500 ms of CPU flood a worker beside short 2 ms tasks; hog Budget.CPU 0.5 cores",
	run:     runCPUHog,
	worker:  cpuHogWorker,
}

// hogPayload is the payload of a hog task: the number of loop iterations it
// spins.
type hogPayload struct {
	Iterations int64 `json:"iterations"`
}

// shortPayload is the payload of a short task. latencyRecorder reads
// EnqueuedAt, as it reads a criticalPayload.
type shortPayload struct {
	EnqueuedAt time.Time `json:"enqueued_at"`
	Iterations int64     `json:"iterations"`
}

// shortResult is the asynq result of a short task, which the parent reads
// after the load, because the worker's report (workerReport) carries only
// enqueue-to-start latencies.
type shortResult struct {
	FinishLatency time.Duration `json:"finish_latency"`
}

// cpuHogRun holds the measurements of one variant that runVariant does not
// return: the worker's CPU use during the load and the short tasks'
// enqueue-to-finish latencies.
type cpuHogRun struct {
	result *variantResult
	cpu    cpuUse
	// finishLatencies holds one latency per completed short task.
	finishLatencies []time.Duration
	// unfinished is the number of short tasks still pending, active or
	// scheduled for retry when the drain timed out.
	unfinished int
}

// runCPUHog runs the scenario with and without the library and prints the
// table.
func runCPUHog(ctx context.Context, env *environment) error {
	rate := measureSpinRate()
	fmt.Printf("cpu-hog: every %s a hog task that spins %s to %s of CPU, every %s a short task that spins %s; "+
		"asynq Concurrency %d, Queues %s:6 %s:1; each run loaded for %s\n",
		cpuHogEvery, cpuHogMinWork, cpuHogMaxWork, cpuHogShortEvery, cpuHogShortWork,
		cpuHogConcurrency, cpuHogShortQueue, cpuHogQueue, env.duration)
	fmt.Printf("with asynqlimit: %s Budget{CPU: %g}, CPU window %s, sample interval %s; %s has no budget\n",
		cpuHogQueue, cpuHogBudget, asynqlimit.DefaultCPUWindow, cpuHogSampleInterval, cpuHogShortQueue)
	fmt.Printf("machine: %d CPUs, GOMAXPROCS %d; spin loop measured at %.0f million iterations per second of CPU\n\n",
		runtime.NumCPU(), runtime.GOMAXPROCS(0), rate/1e6)

	var runs []*cpuHogRun
	for _, variant := range []string{variantWith, variantWithout} {
		run := &cpuHogRun{}
		// runVariant runs the variant on Redis database env.nextDB, where
		// the load function reads the short tasks' results.
		redis := asynq.RedisClientOpt{Addr: env.redisAddr, DB: env.nextDB}
		result, err := runVariant(ctx, env, "cpu-hog", variant, cpuHogLoad(ctx, redis, rate, run))
		if err != nil {
			return err
		}
		run.result = result
		runs = append(runs, run)
	}
	printCPUHogResults(os.Stdout, runs)
	return nil
}

// cpuHogLoad returns the load function of one variant. It enqueues hog and
// short tasks until the load ends while it samples the worker's CPU time,
// then waits for the short queue to drain and reads the short tasks'
// results into run. parent is the context of the whole command, which
// bounds the drain.
func cpuHogLoad(parent context.Context, redis asynq.RedisClientOpt, rate float64, run *cpuHogRun) loadFunc {
	return func(ctx context.Context, client *asynq.Client) (map[string]int, error) {
		worker, err := workerProcess()
		if err != nil {
			return nil, err
		}
		samples := make(chan []cpuSample, 1)
		go func() { samples <- sampleProcessCPU(ctx, worker) }()

		enqueued, err := enqueueCPUHogLoad(ctx, client, rate)
		run.cpu = summarizeCPU(<-samples)
		if err != nil {
			return enqueued, err
		}
		if enqueued[cpuHogShortQueue] == 0 || parent.Err() != nil {
			return enqueued, nil
		}
		run.finishLatencies, run.unfinished, err = readShortResults(parent, redis, worker)
		return enqueued, err
	}
}

// enqueueCPUHogLoad enqueues hog and short tasks at their intervals until ctx
// ends. The hog tasks' CPU times come from a fixed seed, so both variants
// get the same sequence.
func enqueueCPUHogLoad(ctx context.Context, client *asynq.Client, rate float64) (map[string]int, error) {
	enqueued := map[string]int{}
	random := rand.New(rand.NewPCG(1, 2))
	hogTicker := time.NewTicker(cpuHogEvery)
	defer hogTicker.Stop()
	shortTicker := time.NewTicker(cpuHogShortEvery)
	defer shortTicker.Stop()
	// Completed tasks are kept so that asynq.Inspector can count them and
	// the parent can read the short tasks' results.
	retention := asynq.Retention(time.Hour)
	shortIterations := spinIterations(cpuHogShortWork, rate)
	for {
		var err error
		select {
		case <-ctx.Done():
			return enqueued, nil
		case <-hogTicker.C:
			work := cpuHogMinWork + time.Duration(random.Int64N(int64(cpuHogMaxWork-cpuHogMinWork)+1))
			err = enqueueJSON(ctx, client, cpuHogType, hogPayload{Iterations: spinIterations(work, rate)}, cpuHogQueue, retention)
			if err == nil {
				enqueued[cpuHogQueue]++
			}
		case now := <-shortTicker.C:
			payload := shortPayload{EnqueuedAt: now, Iterations: shortIterations}
			err = enqueueJSON(ctx, client, cpuHogShortType, payload, cpuHogShortQueue, retention)
			if err == nil {
				enqueued[cpuHogShortQueue]++
			}
		}
		if err != nil && ctx.Err() == nil {
			return enqueued, err
		}
	}
}

// enqueueJSON enqueues a task of type typ with payload encoded as JSON on
// queue.
func enqueueJSON(ctx context.Context, client *asynq.Client, typ string, payload any, queue string, opts ...asynq.Option) error {
	data, err := json.Marshal(payload)
	if err != nil {
		return err
	}
	opts = append(opts, asynq.Queue(queue))
	_, err = client.EnqueueContext(ctx, asynq.NewTask(typ, data), opts...)
	return err
}

// readShortResults waits up to cpuHogDrainTimeout, and while worker runs,
// for the short queue to have no pending, active or retry tasks. Then it
// returns the enqueue-to-finish latency of every completed short task and
// the number of short tasks that had not finished.
func readShortResults(ctx context.Context, redis asynq.RedisClientOpt, worker *process.Process) ([]time.Duration, int, error) {
	inspector := asynq.NewInspector(redis)
	defer inspector.Close()

	unfinished := 0
	deadline := time.Now().Add(cpuHogDrainTimeout)
	for {
		info, err := inspector.GetQueueInfo(cpuHogShortQueue)
		if err != nil {
			return nil, 0, fmt.Errorf("read queue %s on Redis database %d: %w", cpuHogShortQueue, redis.DB, err)
		}
		unfinished = info.Pending + info.Active + info.Scheduled + info.Retry
		if unfinished == 0 || time.Now().After(deadline) {
			break
		}
		if running, err := worker.IsRunning(); err != nil || !running {
			break // the worker exited early, and runVariant reports why
		}
		select {
		case <-ctx.Done():
			return nil, 0, ctx.Err()
		case <-time.After(100 * time.Millisecond):
		}
	}

	const pageSize = 500
	var latencies []time.Duration
	for page := 1; ; page++ {
		tasks, err := inspector.ListCompletedTasks(cpuHogShortQueue, asynq.PageSize(pageSize), asynq.Page(page))
		if err != nil {
			return nil, 0, fmt.Errorf("list the completed tasks of queue %s on Redis database %d: %w", cpuHogShortQueue, redis.DB, err)
		}
		for _, task := range tasks {
			var result shortResult
			if err := json.Unmarshal(task.Result, &result); err != nil {
				return nil, 0, fmt.Errorf("invalid result %q of short task %s: %w", task.Result, task.ID, err)
			}
			latencies = append(latencies, result.FinishLatency)
		}
		if len(tasks) < pageSize {
			return latencies, unfinished, nil
		}
	}
}

// workerProcess returns the worker process that runVariant started: the
// only child process of this one.
func workerProcess() (*process.Process, error) {
	self, err := process.NewProcess(int32(os.Getpid()))
	if err != nil {
		return nil, fmt.Errorf("read this process to find its worker process: %w", err)
	}
	children, err := self.Children()
	if err != nil {
		return nil, fmt.Errorf("list the child processes of process %d: %w", self.Pid, err)
	}
	if len(children) != 1 {
		return nil, fmt.Errorf("found %d child processes of process %d, expected only the worker process", len(children), self.Pid)
	}
	return children[0], nil
}

// cpuSample is the CPU time, user and system, that a process had used at
// one instant.
type cpuSample struct {
	at  time.Time
	cpu time.Duration
}

// sampleProcessCPU reads the CPU time of proc every cpuHogCPUSampleInterval,
// once at the start and once at the end, until ctx ends or proc exits.
func sampleProcessCPU(ctx context.Context, proc *process.Process) []cpuSample {
	var samples []cpuSample
	read := func() bool {
		times, err := proc.Times()
		if err != nil {
			return false // the worker has exited
		}
		cpu := time.Duration((times.User + times.System) * float64(time.Second))
		samples = append(samples, cpuSample{at: time.Now(), cpu: cpu})
		return true
	}
	if !read() {
		return samples
	}
	ticker := time.NewTicker(cpuHogCPUSampleInterval)
	defer ticker.Stop()
	for {
		select {
		case <-ctx.Done():
			read()
			return samples
		case <-ticker.C:
			if !read() {
				return samples
			}
		}
	}
}

// cpuUse is a process's CPU use over the load, in cores.
type cpuUse struct {
	// mean is the average over the whole load, and maxWindow the highest
	// average over any span of at least asynqlimit.DefaultCPUWindow between
	// two samples. Both are -1 with fewer than two samples.
	mean, maxWindow float64
}

// summarizeCPU returns the CPU use that samples show.
func summarizeCPU(samples []cpuSample) cpuUse {
	use := cpuUse{mean: -1, maxWindow: -1}
	if len(samples) < 2 {
		return use
	}
	cores := func(from, to cpuSample) float64 {
		return (to.cpu - from.cpu).Seconds() / to.at.Sub(from.at).Seconds()
	}
	use.mean = cores(samples[0], samples[len(samples)-1])
	for i, from := range samples {
		// The first sample at least one window after from.
		j := sort.Search(len(samples), func(j int) bool {
			return samples[j].at.Sub(from.at) >= asynqlimit.DefaultCPUWindow
		})
		if j < len(samples) && j > i {
			use.maxWindow = max(use.maxWindow, cores(from, samples[j]))
		}
	}
	return use
}

// cpuHogWorker builds the server of one variant: asynqlimit.NewServer with
// a CPU budget on the hog queue, or a plain asynq.NewServer. Both run the
// same handlers.
func cpuHogWorker(run *workerRun) (workerServer, asynq.Handler, error) {
	mux := asynq.NewServeMux()
	mux.HandleFunc(cpuHogShortType, func(ctx context.Context, t *asynq.Task) error {
		return runShortTask(ctx, t, run.latencies)
	})
	mux.HandleFunc(cpuHogType, runHogTask)

	cfg := asynq.Config{
		Concurrency: cpuHogConcurrency,
		Queues:      map[string]int{cpuHogShortQueue: 6, cpuHogQueue: 1},
		// asynq waits TaskCheckInterval (1s by default) after it finds
		// every queue empty, which would dominate the short tasks' latency.
		TaskCheckInterval: 20 * time.Millisecond,
		// Deferred tasks return to pending on this tick (5s by default).
		DelayedTaskCheckInterval: time.Second,
		ShutdownTimeout:          5 * time.Second,
		LogLevel:                 asynqLogLevel(run.logger),
	}
	switch run.variant {
	case variantWithout:
		return asynq.NewServer(run.redis, cfg), mux, nil
	case variantWith:
		// The hog queue has no Concurrency cap: the CPU budget alone keeps
		// it in check, because admission counts the tasks admitted since the
		// last sample.
		limits := asynqlimit.Limits{
			Queues: map[string]asynqlimit.Budget{
				cpuHogQueue:      {CPU: cpuHogBudget},
				cpuHogShortQueue: {},
			},
		}
		srv, err := asynqlimit.NewServer(run.redis, cfg, limits, asynqlimit.WithRegisterer(run.registry),
			asynqlimit.WithLogger(run.logger), asynqlimit.WithSampleInterval(cpuHogSampleInterval))
		if err != nil {
			return nil, nil, err
		}
		return srv, mux, nil
	}
	return nil, nil, fmt.Errorf("unknown variant %q of cpu-hog: use %q or %q", run.variant, variantWith, variantWithout)
}

// runHogTask spins the iterations of a hog task, or until ctx ends.
func runHogTask(ctx context.Context, t *asynq.Task) error {
	var payload hogPayload
	if err := json.Unmarshal(t.Payload(), &payload); err != nil {
		return fmt.Errorf("invalid hog task payload %q: %v: %w", t.Payload(), err, asynq.SkipRetry)
	}
	return spin(ctx, payload.Iterations)
}

// runShortTask records the enqueue-to-start latency of a short task with
// recorder, spins its iterations and writes its enqueue-to-finish latency
// as the task's result.
func runShortTask(ctx context.Context, t *asynq.Task, recorder *latencyRecorder) error {
	if err := recorder.ProcessTask(ctx, t); err != nil {
		return err
	}
	var payload shortPayload
	if err := json.Unmarshal(t.Payload(), &payload); err != nil {
		return fmt.Errorf("invalid short task payload %q: %v: %w", t.Payload(), err, asynq.SkipRetry)
	}
	if err := spin(ctx, payload.Iterations); err != nil {
		return err
	}
	result, err := json.Marshal(shortResult{FinishLatency: time.Since(payload.EnqueuedAt)})
	if err != nil {
		return err
	}
	if _, err := t.ResultWriter().Write(result); err != nil {
		return fmt.Errorf("write the result of short task %s: %w", t.ResultWriter().TaskID(), err)
	}
	return nil
}

// spinChunk is the number of loop iterations between two checks of the
// context: tens of microseconds of CPU.
const spinChunk = 1 << 14

// spinSink receives the value that spin computes, so that the compiler
// cannot drop the loop.
var spinSink atomic.Uint64

// spin runs iterations of a xorshift loop on the calling goroutine, which
// uses only the CPU, and checks ctx every spinChunk iterations. It returns
// ctx.Err() when ctx ends first.
func spin(ctx context.Context, iterations int64) error {
	x := uint64(88172645463325252)
	defer func() { spinSink.Add(x) }()
	for done := int64(0); done < iterations; done += spinChunk {
		if err := ctx.Err(); err != nil {
			return err
		}
		x = xorshift(x, min(spinChunk, iterations-done))
	}
	return nil
}

func xorshift(x uint64, n int64) uint64 {
	for range n {
		x ^= x << 13
		x ^= x >> 7
		x ^= x << 17
	}
	return x
}

// measureSpinRate returns the loop iterations per second of CPU that spin
// runs on this machine. It times several short runs and keeps the fastest,
// which is the one least slowed by other work on the core.
func measureSpinRate() float64 {
	const iterations = 1 << 22
	fastest := time.Duration(1<<63 - 1)
	for range 20 {
		start := time.Now()
		spinSink.Add(xorshift(uint64(start.UnixNano())|1, iterations))
		fastest = min(fastest, time.Since(start))
	}
	return iterations / fastest.Seconds()
}

// spinIterations converts a CPU time to loop iterations at rate iterations
// per second.
func spinIterations(cpu time.Duration, rate float64) int64 {
	return int64(cpu.Seconds() * rate)
}

// printCPUHogResults prints one row per run: the worker's CPU use, the
// short tasks' latency and what became of the hog tasks, then the
// library's nonzero counters.
func printCPUHogResults(w io.Writer, runs []*cpuHogRun) {
	tw := tabwriter.NewWriter(w, 0, 0, 2, ' ', 0)
	fmt.Fprintln(tw, "run\tworker cores mean\tmax 1s\tshort start p50\tstart p99\tshort finish p50\tfinish p99\t"+
		"short completed\thog completed\tshort archived\thog archived\t")
	for _, run := range runs {
		r := run.result
		started := r.report.CriticalLatencies
		completed := func(q *asynq.QueueInfo) int { return q.Completed }
		archived := func(q *asynq.QueueInfo) int { return q.Archived }
		fmt.Fprintf(tw, "%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t\n",
			r.variant, formatCores(run.cpu.mean), formatCores(run.cpu.maxWindow),
			formatLatency(percentile(started, 50)), formatLatency(percentile(started, 99)),
			formatLatency(percentile(run.finishLatencies, 50)), formatLatency(percentile(run.finishLatencies, 99)),
			queueCount(r, cpuHogShortQueue, completed), queueCount(r, cpuHogQueue, completed),
			queueCount(r, cpuHogShortQueue, archived), queueCount(r, cpuHogQueue, archived))
	}
	tw.Flush()

	for _, run := range runs {
		r := run.result
		if r.aborted != "" {
			fmt.Fprintf(w, "%s: run cut short: %s\n", r.variant, r.aborted)
		}
		if run.unfinished > 0 {
			fmt.Fprintf(w, "%s: %d short tasks had not finished %s after the load; the finish latencies leave them out\n",
				r.variant, run.unfinished, cpuHogDrainTimeout)
		}
		var keys []string
		for key, value := range r.report.Counters {
			if value != 0 {
				keys = append(keys, key)
			}
		}
		slices.Sort(keys)
		for _, key := range keys {
			fmt.Fprintf(w, "%s: %s %v\n", r.variant, key, r.report.Counters[key])
		}
	}
}

func formatCores(cores float64) string {
	if cores < 0 {
		return "n/a"
	}
	return fmt.Sprintf("%.2f", cores)
}
