package asynqlimit

import (
	"math"
	"regexp"
	"strconv"
	"testing"
	"time"
)

// When tasks in transit close a queue's gate for CPU, the log line shows the
// numbers that closed it, the tasks in transit and their share included.
func TestGateCPULogShowsTransit(t *testing.T) {
	skipWithoutThreadCPU(t)
	l, logs := newGateLimiter(t, Limits{Queues: map[string]Budget{"cpu": {CPU: 1}}})
	q := l.named["cpu"]
	q.cpu.cores.Store(math.Float64bits(0.5))
	q.cpu.perTask.Store(math.Float64bits(0.25))
	q.gate.transitAt.Store(int64(time.Since(gateEpoch)))
	q.gate.inTransit.Store(2)

	reason, closed := l.gateReason(q, q.gate.transit())
	if !closed || reason != ReasonCPU {
		t.Fatalf("gateReason = %q, %v, expected %q, true", reason, closed, ReasonCPU)
	}
	l.gate.update(q, reason, closed)

	output := logs.String()
	match := regexp.MustCompile(`dequeue gate closed[^\n]*cpu_cores=([0-9.]+)`).FindStringSubmatch(output)
	if match == nil {
		t.Fatalf("no gate-closed line with cpu_cores in the log:\n%s", output)
	}
	cores, err := strconv.ParseFloat(match[1], 64)
	if err != nil {
		t.Fatal(err)
	}
	transitLogged := regexp.MustCompile(`dequeue gate closed[^\n]*in_transit=2`).MatchString(output)
	if cores < q.budget.CPU && !transitLogged {
		t.Errorf("gate closed for CPU logs cpu_cores=%v, below the budget of %v, without in_transit:\n%s",
			cores, q.budget.CPU, output)
	}
}
