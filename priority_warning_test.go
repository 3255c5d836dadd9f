package asynqlimit

import (
	"log/slog"
	"strings"
	"testing"
	"time"

	"github.com/hibiken/asynq"
)

// The highest priority is never shed or preempted, so with one Priority on
// every served queue process pressure cannot act, and New or ServerConfig
// logs a warning.
func TestOnePriorityWarns(t *testing.T) {
	cases := []struct {
		name     string
		queues   map[string]Budget
		priority int
	}{
		{"all zero", map[string]Budget{"emails": {TaskMemory: 10}, "reports": {TaskMemory: 50}}, 0},
		// The Default budget keeps priority 0, but it applies only to queues
		// that are not named, which this server may not serve at all.
		{"named queues equal", map[string]Budget{"emails": {TaskMemory: 10, Priority: 1}, "reports": {TaskMemory: 50, Priority: 1}}, 1},
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			logs := &syncBuffer{}
			limits := Limits{Queues: c.queues, Process: ProcessLimits{MemorySoft: 100, MemoryHard: 200}}
			l, _, _ := newMonitoredLimiter(t, limits,
				WithLogger(slog.New(slog.NewTextHandler(logs, &slog.HandlerOptions{Level: slog.LevelDebug}))))
			l.ServerConfig(asynqConfigFor("emails", "reports"))
			setupLogs := logs.String() // before any sample, so only New and ServerConfig logged
			now := time.Unix(1000, 0)
			for i := range 5 {
				l.monitor.step(ResourceSample{RSS: 10_000}, nil, now.Add(time.Duration(i)*time.Second))
			}
			trackedRun(l, "reports", 50, true, now)

			shed, preempted := l.monitor.sheds(c.priority, 50), l.preemptOne()
			warned := false
			for line := range strings.Lines(setupLogs) {
				if strings.Contains(line, "level=WARN") && strings.Contains(strings.ToLower(line), "priorit") {
					warned = true
				}
			}
			if !shed && !preempted && !warned {
				t.Errorf("RSS 50x over MemoryHard: sheds = %v, preempted = %v, and no warning that Limits.Process "+
					"cannot act when every served queue has the same Priority; logs of New and ServerConfig:\n%s", shed, preempted, setupLogs)
			}
		})
	}
}

// asynqConfigFor returns a server config that serves queues.
func asynqConfigFor(queues ...string) asynq.Config {
	served := make(map[string]int, len(queues))
	for _, q := range queues {
		served[q] = 1
	}
	return asynq.Config{Concurrency: 8, Queues: served}
}
