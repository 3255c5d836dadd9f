// Command scenarios runs a misbehaving workload twice: against a worker with
// asynqlimit and against a plain asynq worker, each in a fresh child process.
// It prints what each run cost. The scenarios are:
//
//   - runaway-memory: low tasks that each hold 100 MiB beside quick critical
//     tasks. It reports peak resident memory, the latency of the critical
//     queue and how much low-priority work completed.
//   - cpu-hog: CPU-bound hog tasks beside short tasks, with Budget.CPU on
//     the hog queue. It reports the worker's CPU use, the short tasks'
//     enqueue-to-start and enqueue-to-finish latency, and how many hog
//     tasks completed.
//
// Run it from the repository root:
//
//	go run ./examples/scenarios -name runaway-memory
//	go run ./examples/scenarios -name cpu-hog
//	go run ./examples/scenarios -name runaway-memory -duration 30s
//	REDIS_ADDR=127.0.0.1:6379 go run ./examples/scenarios -name runaway-memory
//
// Without REDIS_ADDR it starts an embedded miniredis on 127.0.0.1 in this
// process. With REDIS_ADDR it uses one database of that server per run, from
// database 1 up, and stops with an error if that database already has asynq
// queues. It deletes the queues it created when a run ends.
//
// Each run starts this program again as a worker process (the hidden flag
// -worker), loads it for -duration, closes the worker's stdin to stop it and
// reads its report from its stdout. The parent samples the worker's resident
// memory with gopsutil every 50ms.
//
// To add a scenario, write a scenario value (see runawayMemory in
// runaway_memory.go) and add it to the scenarios map below.
package main

import (
	"context"
	"errors"
	"flag"
	"fmt"
	"log/slog"
	"maps"
	"os"
	"os/signal"
	"slices"
	"strings"
	"syscall"
	"time"

	"github.com/alicebob/miniredis/v2"
	"github.com/hibiken/asynq"
)

// scenario is a workload that the runner can run. Its run function runs in
// the parent process and starts one worker process per variant with
// runVariant. Its worker function runs in that worker process.
type scenario struct {
	// summary is the one-line description in the list of scenarios.
	summary string
	// run runs every variant of the scenario and prints the results.
	run func(ctx context.Context, env *environment) error
	// worker builds the server of one variant and the handler it runs. It
	// runs in the worker process, which starts the server and shuts it down.
	worker func(run *workerRun) (workerServer, asynq.Handler, error)
}

// scenarios maps each -name to its scenario.
var scenarios = map[string]scenario{
	"cpu-hog":        cpuHog,
	"runaway-memory": runawayMemory,
}

// workerServer is the server of one variant: *asynqlimit.Server or
// *asynq.Server.
type workerServer interface {
	Start(handler asynq.Handler) error
	Shutdown()
}

// environment is the state that the scenarios share in the parent process.
type environment struct {
	redisAddr string
	// duration is how long each run is loaded.
	duration time.Duration
	// logLevel is the minimum level of the worker processes' logs.
	logLevel slog.Level
	// nextDB is the Redis database of the next run.
	nextDB int
}

// workerFlag is the hidden flag that makes the program a worker process.
// Its value is a JSON workerSpec.
const workerFlag = "worker"

func main() {
	fs := flag.NewFlagSet("scenarios", flag.ContinueOnError)
	name := fs.String("name", "", "scenario to run: "+strings.Join(scenarioNames(), ", "))
	duration := fs.Duration("duration", 20*time.Second,
		"how long each run is loaded, as a Go duration such as 20s; every scenario runs twice")
	logLevel := fs.String("log-level", "error",
		"minimum level of the worker processes' logs on stderr: debug, info, warn or error")
	worker := fs.String(workerFlag, "", "")
	fs.Usage = func() { printUsage(fs) }
	if err := fs.Parse(os.Args[1:]); err != nil {
		if errors.Is(err, flag.ErrHelp) {
			return
		}
		os.Exit(2)
	}

	if *worker != "" {
		if err := runWorkerProcess(*worker); err != nil {
			fmt.Fprintln(os.Stderr, "scenarios worker:", err)
			os.Exit(1)
		}
		return
	}

	env, sc, err := parseArgs(fs, *name, *duration, *logLevel)
	if err != nil {
		fmt.Fprintln(os.Stderr, "scenarios:", err)
		os.Exit(2)
	}
	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	defer stop()
	if err := runScenario(ctx, env, sc); err != nil {
		fmt.Fprintln(os.Stderr, "scenarios:", err)
		stop()
		os.Exit(1)
	}
}

// parseArgs checks the flags and returns the environment and the scenario
// to run. Its errors name the value and the fix.
func parseArgs(fs *flag.FlagSet, name string, duration time.Duration, logLevel string) (*environment, scenario, error) {
	if fs.NArg() > 0 {
		return nil, scenario{}, fmt.Errorf("unexpected argument %q: the command takes only flags (run with -h to list them)", fs.Arg(0))
	}
	if name == "" {
		return nil, scenario{}, fmt.Errorf("missing -name: set it to one of %s", strings.Join(scenarioNames(), ", "))
	}
	sc, ok := scenarios[name]
	if !ok {
		return nil, scenario{}, fmt.Errorf("unknown scenario %q: set -name to one of %s", name, strings.Join(scenarioNames(), ", "))
	}
	if duration <= 0 {
		return nil, scenario{}, fmt.Errorf("invalid -duration %s: must be greater than zero, for example -duration 20s", duration)
	}
	env := &environment{duration: duration, nextDB: 1}
	if err := env.logLevel.UnmarshalText([]byte(logLevel)); err != nil {
		return nil, scenario{}, fmt.Errorf("invalid -log-level %q: use debug, info, warn or error", logLevel)
	}
	return env, sc, nil
}

// runScenario connects to Redis, or starts miniredis, and runs sc.
func runScenario(ctx context.Context, env *environment, sc scenario) error {
	if addr := os.Getenv("REDIS_ADDR"); addr != "" {
		fmt.Fprintf(os.Stderr, "scenarios: using Redis at %s from REDIS_ADDR\n", addr)
		env.redisAddr = addr
		return sc.run(ctx, env)
	}

	mr, err := miniredis.Run()
	if err != nil {
		return fmt.Errorf("start embedded miniredis: %w (set REDIS_ADDR to use a Redis server instead)", err)
	}
	defer mr.Close()
	fmt.Fprintf(os.Stderr, "scenarios: REDIS_ADDR is not set, so using an embedded miniredis at %s\n", mr.Addr())
	env.redisAddr = mr.Addr()
	return sc.run(ctx, env)
}

// printUsage prints the usage, the scenarios and every flag but the hidden
// -worker.
func printUsage(fs *flag.FlagSet) {
	out := fs.Output()
	fmt.Fprintln(out, "Usage: go run ./examples/scenarios -name NAME [-duration 20s] [-log-level error]")
	fmt.Fprintln(out, "\nScenarios:")
	for _, name := range scenarioNames() {
		fmt.Fprintf(out, "  %-16s %s\n", name, scenarios[name].summary)
	}
	fmt.Fprintln(out, "\nFlags:")
	fs.VisitAll(func(f *flag.Flag) {
		if f.Name == workerFlag {
			return
		}
		fmt.Fprintf(out, "  -%s\n    \t%s (default %q)\n", f.Name, f.Usage, f.DefValue)
	})
}

func scenarioNames() []string {
	return slices.Sorted(maps.Keys(scenarios))
}
