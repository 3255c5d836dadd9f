package asynqlimit

import (
	"testing"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/testutil"
)

// New reads the memory once, so that the reservation of a task admitted
// before the first tick comes off as the samples show the memory grow.
func TestReservationBeforeFirstTick(t *testing.T) {
	limits := twoPriorities(30)
	limits.Process.MemorySoft = 120
	sampler := &fakeSampler{}
	sampler.set(40, nil) // the process before any task
	l, err := New(limits, WithSampler(sampler), WithSampleInterval(time.Hour), withDetectedLimits(testDetected),
		WithRegisterer(prometheus.NewRegistry()))
	if err != nil {
		t.Fatal(err)
	}
	defer l.Close()

	started, release := make(chan struct{}), make(chan struct{})
	h := l.Middleware()(blockingHandler(started, release))
	first := blockingTasks(t, h, "first", 1, started)

	// The task allocated its 30 bytes.
	l.monitor.step(ResourceSample{RSS: 70}, nil, time.Unix(1000, 0))
	l.monitor.step(ResourceSample{RSS: 70}, nil, time.Unix(1001, 0))
	pending := l.monitor.pending.total()

	// 70 + 30 stays below the soft 120.
	second := blockingTasks(t, h, "second", 1, started)
	shed := l.queue("").metrics.deferrals[ReasonPressure]
	if got := testutil.ToFloat64(shed); got != 0 {
		t.Errorf("deferrals{pressure} = %v for a 30-byte task at RSS 70 under a soft threshold of 120, want 0; "+
			"the first task's reservation of 30 bytes, which both samples show, still counts (pending %d bytes)", got, pending)
	}
	close(release)
	<-first
	<-second
}
