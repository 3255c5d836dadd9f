package asynqlimit

import (
	"errors"
	"log/slog"
	"strings"
	"testing"

	"github.com/prometheus/client_golang/prometheus/testutil"
)

// New reads the process's memory once. A failed first reading counts and
// logs like any failed sample.
func TestFirstSampleErrorReported(t *testing.T) {
	sampler := &fakeSampler{err: errors.New("statm unreadable")}
	logs := &syncBuffer{}
	l, _, _ := newMonitoredLimiter(t, threeQueues(ProcessLimits{MemorySoft: 100, MemoryHard: 500}),
		WithSampler(sampler), WithLogger(slog.New(slog.NewTextHandler(logs, nil))))

	if got := testutil.ToFloat64(l.monitor.metrics.samplerErrors); got != 1 {
		t.Errorf("sampler_errors_total after the first sample in New failed = %v, expected 1", got)
	}
	if !strings.Contains(logs.String(), "statm unreadable") {
		t.Errorf("the error of the first sample in New is missing from the log:\n%s", logs.String())
	}
}
