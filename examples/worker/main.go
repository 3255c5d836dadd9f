// Command worker runs an asynq worker under asynqlimit budgets on a short
// mixed workload and prints what the limiter did with it.
//
// It shows four things. Slow tasks on "default" and "low" fill those queues'
// concurrency caps, so the dequeue gate keeps the queues' other tasks pending
// in Redis until there is room (the "skipped" count). Without the gate they
// would be deferred without spending a retry. One task on "default" has a
// payload over the queue's MaxPayload and is archived without running. One
// task on "low" ignores its context, runs past the queue's 300ms timeout and
// is abandoned, then succeeds on its retry; it holds the queue's only slot
// until it really returns. Tasks enqueued with asynq.MaxRetry(0) are on
// their last attempt, so the middleware would let them wait for room rather
// than defer them.
//
// Run it from the repository root:
//
//	go run ./examples/worker
//	go run ./examples/worker -duration 30s -log-level info
//	REDIS_ADDR=127.0.0.1:6379 go run ./examples/worker
//
// Without REDIS_ADDR it starts an embedded miniredis on 127.0.0.1. With
// REDIS_ADDR it uses database 0 of that server and leaves the tasks there, so
// point it at a scratch server: tasks left pending by an earlier run are
// processed too and show up in the per-second counts.
//
// It runs for 10s (set -duration) or until Ctrl-C. Every second it prints one
// line per queue to stdout, with numbers read from the Prometheus registry.
// At the end it prints a summary that adds asynq's own view of each task
// this run enqueued, read through an asynq.Inspector.
// While it runs, the registry is served at http://127.0.0.1:2112/metrics.
package main

import (
	"context"
	"errors"
	"flag"
	"fmt"
	"log/slog"
	"net"
	"net/http"
	"os"
	"os/signal"
	"syscall"
	"time"

	"github.com/alicebob/miniredis/v2"
	"github.com/hibiken/asynq"
	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/collectors"
	"github.com/prometheus/client_golang/prometheus/promhttp"

	"github.com/asynqlimit/asynqlimit"
)

// config holds the parsed command-line flags.
type config struct {
	duration    time.Duration
	metricsAddr string
	logLevel    slog.Level
}

func main() {
	cfg, err := parseFlags(os.Args[1:])
	if errors.Is(err, flag.ErrHelp) {
		return
	}
	if err != nil {
		fmt.Fprintln(os.Stderr, "worker:", err)
		os.Exit(2)
	}

	logger := slog.New(slog.NewTextHandler(os.Stderr, &slog.HandlerOptions{Level: cfg.logLevel}))
	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	defer stop()

	if err := run(ctx, stop, cfg, logger); err != nil {
		logger.Error("worker example failed", "error", err)
		stop()
		os.Exit(1)
	}
}

// parseFlags parses args into a config. Its errors name the value and the
// fix. For a value that does not parse, the flag package also prints the
// usage.
func parseFlags(args []string) (config, error) {
	fs := flag.NewFlagSet("worker", flag.ContinueOnError)
	duration := fs.Duration("duration", 10*time.Second,
		"how long to run before shutting down, as a Go duration such as 8s or 1m")
	metricsAddr := fs.String("metrics-addr", "127.0.0.1:2112",
		"host:port to serve /metrics on. Keep it on a loopback address unless other hosts should read the metrics")
	logLevel := fs.String("log-level", "warn",
		"minimum level of the logs written to stderr: debug, info, warn or error")
	if err := fs.Parse(args); err != nil {
		return config{}, err
	}
	if fs.NArg() > 0 {
		return config{}, fmt.Errorf("unexpected argument %q: the command takes only flags (run with -h to list them)", fs.Arg(0))
	}

	cfg := config{duration: *duration, metricsAddr: *metricsAddr}
	if cfg.duration <= 0 {
		return config{}, fmt.Errorf("invalid -duration %s: must be greater than zero, for example -duration 10s", cfg.duration)
	}
	if _, _, err := net.SplitHostPort(cfg.metricsAddr); err != nil {
		return config{}, fmt.Errorf("invalid -metrics-addr %q: %v (use host:port, for example -metrics-addr 127.0.0.1:2112)", cfg.metricsAddr, err)
	}
	if err := cfg.logLevel.UnmarshalText([]byte(*logLevel)); err != nil {
		return config{}, fmt.Errorf("invalid -log-level %q: use debug, info, warn or error", *logLevel)
	}
	return cfg, nil
}

// run starts Redis (when REDIS_ADDR is unset), the worker and the metrics
// server, enqueues the workload and prints status lines until ctx ends or
// cfg.duration passes. It then shuts everything down and prints the summary.
// stop restores the default signal handling, so a second Ctrl-C during
// shutdown ends the process at once.
func run(ctx context.Context, stop context.CancelFunc, cfg config, logger *slog.Logger) error {
	redisOpt, closeRedis, err := connectRedis()
	if err != nil {
		return err
	}
	defer closeRedis()

	reg := prometheus.NewRegistry()
	reg.MustRegister(
		collectors.NewGoCollector(),
		collectors.NewProcessCollector(collectors.ProcessCollectorOpts{}),
	)

	srv, err := asynqlimit.NewServer(redisOpt, serverConfig(logger, cfg.logLevel), exampleLimits(),
		asynqlimit.WithRegisterer(reg), asynqlimit.WithLogger(logger))
	if err != nil {
		return fmt.Errorf("create server: %w", err)
	}
	// Closing the limiter closes the Inspector that NewServer created for the
	// queue size metrics. srv.Shutdown closes it too, and a second Close does
	// nothing, but this covers the returns before srv.Start.
	defer closeLogged(logger, "limiter", srv.Limiter().Close)
	if err := srv.Ping(); err != nil {
		return fmt.Errorf("ping Redis at %s: %w (start Redis there, or unset REDIS_ADDR to use the embedded miniredis)", redisOpt.Addr, err)
	}

	metricsServer, err := serveMetrics(cfg.metricsAddr, reg, logger)
	if err != nil {
		return err
	}
	defer shutdownMetrics(metricsServer, logger)

	client := asynq.NewClient(redisOpt)
	defer closeLogged(logger, "asynq client", client.Close)
	inspector := asynq.NewInspector(redisOpt)
	defer closeLogged(logger, "asynq inspector", inspector.Close)

	// Enqueue before the server starts: a server that finds every queue
	// empty sleeps for its TaskCheckInterval (1s by default) before it looks
	// again.
	tasks, err := enqueueWorkload(ctx, client)
	if err != nil {
		return err
	}

	runCtx, cancel := context.WithTimeout(ctx, cfg.duration)
	defer cancel()
	start := time.Now()
	if err := srv.Start(newMux()); err != nil {
		return fmt.Errorf("start server: %w", err)
	}
	logger.Info("worker started", "redis", redisOpt.Addr, "tasks", len(tasks), "duration", cfg.duration)
	// srv.Shutdown is safe to call twice: asynq makes the second call a no-op.
	defer srv.Shutdown()

	printStatusUntilDone(runCtx, os.Stdout, reg, start, logger)
	if ctx.Err() != nil {
		fmt.Fprintln(os.Stderr, "worker: signal received, shutting down")
	}
	stop()

	// Shut the worker down before the summary so no task changes state while
	// it is read. asynq requeues the tasks still running at the end of its
	// ShutdownTimeout (8s by default).
	srv.Shutdown()
	fmt.Fprintln(os.Stdout)
	printStatus(os.Stdout, reg, time.Since(start), logger)
	return printSummary(os.Stdout, reg, inspector, tasks, logger)
}

// connectRedis returns the options of the Redis server in REDIS_ADDR, or
// starts an embedded miniredis when REDIS_ADDR is unset. The returned
// function stops the miniredis, if any.
func connectRedis() (asynq.RedisClientOpt, func(), error) {
	if addr := os.Getenv("REDIS_ADDR"); addr != "" {
		fmt.Fprintf(os.Stderr, "worker: using Redis at %s from REDIS_ADDR\n", addr)
		return asynq.RedisClientOpt{Addr: addr}, func() {}, nil
	}

	mr, err := miniredis.Run()
	if err != nil {
		return asynq.RedisClientOpt{}, nil, fmt.Errorf("start embedded miniredis: %w (set REDIS_ADDR to use a Redis server instead)", err)
	}
	fmt.Fprintf(os.Stderr, "worker: REDIS_ADDR is not set, so using an embedded miniredis at %s\n", mr.Addr())
	return asynq.RedisClientOpt{Addr: mr.Addr()}, mr.Close, nil
}

// exampleLimits returns the budgets of the three queues. The caps of
// "default" and "low" are small so that the workload fills them.
func exampleLimits() asynqlimit.Limits {
	return asynqlimit.Limits{
		Queues: map[string]asynqlimit.Budget{
			"critical": {Priority: 2, Concurrency: 4, Timeout: 2 * time.Second},
			"default":  {Priority: 1, Concurrency: 2, Timeout: time.Second, MaxPayload: 1024},
			// The timeout is below one second on purpose. asynq stores a
			// task's own Timeout in whole seconds (v0.26 client.go), so
			// asynq.Timeout(300*time.Millisecond) would set no timeout.
			"low": {Priority: 0, Concurrency: 1, Timeout: 300 * time.Millisecond, MaxPayload: 512},
		},
	}
}

// serverConfig returns the asynq config of the worker. NewServer wraps its
// IsFailure, RetryDelayFunc and ErrorHandler so that deferrals spend no retry
// and do not reach logTaskError.
func serverConfig(logger *slog.Logger, level slog.Level) asynq.Config {
	return asynq.Config{
		Concurrency: 8,
		Queues:      map[string]int{"critical": 6, "default": 3, "low": 1},
		// A deferred task waits in asynq's retry set until the forwarder moves
		// it back to pending, which it does every DelayedTaskCheckInterval
		// (5s by default). At 1s, a deferred task comes back within about a
		// second of the end of its deferral delay (DefaultDeferDelay is 1s),
		// so the demo finishes in seconds.
		DelayedTaskCheckInterval: time.Second,
		// The dequeue gate makes a full queue look empty to asynq, and when
		// every queue looks empty asynq sleeps about TaskCheckInterval (1s by
		// default) before it polls again. At 100ms a queue that has room again
		// is served within about 100ms.
		TaskCheckInterval: 100 * time.Millisecond,
		// asynq.DefaultRetryDelayFunc waits at least 15s before a retry,
		// longer than the demo runs, so the timed-out task of "low" would not
		// come back in time. Deferrals do not use this function.
		RetryDelayFunc: func(retried int, _ error, _ *asynq.Task) time.Duration {
			return time.Duration(retried+1) * time.Second
		},
		ErrorHandler: asynq.ErrorHandlerFunc(func(ctx context.Context, t *asynq.Task, err error) {
			logTaskError(ctx, logger, t, err)
		}),
		Logger:   asynqLogger{logger},
		LogLevel: asynqLogLevel(level),
	}
}

// logTaskError logs a task error that asynq will retry or archive.
func logTaskError(ctx context.Context, logger *slog.Logger, t *asynq.Task, err error) {
	queue, _ := asynq.GetQueueName(ctx)
	id, _ := asynq.GetTaskID(ctx)
	retried, _ := asynq.GetRetryCount(ctx)
	maxRetry, _ := asynq.GetMaxRetry(ctx)
	logger.Warn("task failed", "queue", queue, "task_id", id, "task_type", t.Type(),
		"retried", retried, "max_retry", maxRetry, "error", err)
}

// serveMetrics serves reg on addr at /metrics. It listens before returning,
// so a port in use is reported at once.
func serveMetrics(addr string, reg *prometheus.Registry, logger *slog.Logger) (*http.Server, error) {
	warnIfNotLoopback(addr, logger)
	listener, err := net.Listen("tcp", addr)
	if err != nil {
		return nil, fmt.Errorf("listen on -metrics-addr %s: %w (choose a free port, for example -metrics-addr 127.0.0.1:2113)", addr, err)
	}

	handler := promhttp.HandlerFor(reg, promhttp.HandlerOpts{
		ErrorLog: slog.NewLogLogger(logger.Handler(), slog.LevelError),
		Registry: reg,
	})
	mux := http.NewServeMux()
	mux.Handle("/metrics", promhttp.InstrumentMetricHandler(reg, handler))
	server := &http.Server{Handler: mux, ReadHeaderTimeout: 5 * time.Second}

	go func() {
		if err := server.Serve(listener); err != nil && !errors.Is(err, http.ErrServerClosed) {
			logger.Error("metrics server stopped", "addr", listener.Addr().String(), "error", err)
		}
	}()
	fmt.Fprintf(os.Stderr, "worker: serving metrics at http://%s/metrics\n", listener.Addr())
	return server, nil
}

// warnIfNotLoopback logs a warning when addr may accept connections from
// other hosts. An empty host listens on every interface.
func warnIfNotLoopback(addr string, logger *slog.Logger) {
	host, _, _ := net.SplitHostPort(addr)
	if host == "localhost" {
		return
	}
	if ip := net.ParseIP(host); ip != nil && ip.IsLoopback() {
		return
	}
	logger.Warn("metrics are served on an address that other hosts may reach, so use 127.0.0.1 unless that is intended",
		"metrics_addr", addr)
}

func shutdownMetrics(server *http.Server, logger *slog.Logger) {
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	if err := server.Shutdown(ctx); err != nil {
		logger.Error("shut down metrics server", "error", err)
	}
}

// closeLogged calls closeFunc and logs its error, for deferred closes.
func closeLogged(logger *slog.Logger, what string, closeFunc func() error) {
	if err := closeFunc(); err != nil {
		logger.Error("close "+what, "error", err)
	}
}

// asynqLogger sends asynq's own logs to a slog.Logger, so that both write the
// same format to stderr.
type asynqLogger struct {
	logger *slog.Logger
}

func (l asynqLogger) Debug(args ...any) { l.log(slog.LevelDebug, args) }
func (l asynqLogger) Info(args ...any)  { l.log(slog.LevelInfo, args) }
func (l asynqLogger) Warn(args ...any)  { l.log(slog.LevelWarn, args) }
func (l asynqLogger) Error(args ...any) { l.log(slog.LevelError, args) }

// Fatal logs at error level and exits with status 1, as the asynq.Logger
// interface requires.
func (l asynqLogger) Fatal(args ...any) {
	l.log(slog.LevelError, args)
	os.Exit(1)
}

func (l asynqLogger) log(level slog.Level, args []any) {
	l.logger.Log(context.Background(), level, fmt.Sprint(args...), "component", "asynq")
}

// asynqLogLevel returns the asynq log level that lets through the same
// messages as the slog level.
func asynqLogLevel(level slog.Level) asynq.LogLevel {
	switch {
	case level <= slog.LevelDebug:
		return asynq.DebugLevel
	case level <= slog.LevelInfo:
		return asynq.InfoLevel
	case level <= slog.LevelWarn:
		return asynq.WarnLevel
	default:
		return asynq.ErrorLevel
	}
}
