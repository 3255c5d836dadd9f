package asynqlimit

import (
	"context"
	"math"
	"sync"
	"testing"
	"time"

	"github.com/hibiken/asynq"
)

// A sample that runs while a task finishes must not read the task's thread
// once other goroutines may run on it: that reading would exceed the task's
// CPU time, and unlockThread would then add a negative number to
// finishedSince. unlockThread reads the clock, untracks the run, and only
// then releases the thread.
func TestCPUSampleOfFinishingTask(t *testing.T) {
	skipWithoutThreadCPU(t)
	l := newSampledCPULimiter(t, 8)
	q := l.queue("")
	l.sampleCPU()

	release := make(chan struct{})
	running := make(chan struct{})
	h := l.Middleware()(asynq.HandlerFunc(func(context.Context, *asynq.Task) error {
		close(running)
		<-release
		return nil
	}))
	errs := make(chan error, 1)
	go func() { errs <- h.ProcessTask(context.Background(), asynq.NewTask("short", nil)) }()
	<-running

	// Hold the queue's lock so that the sample queues on it first and the
	// finishing task second, after it has read its thread's clock.
	q.runsMu.Lock()
	sampled := make(chan struct{})
	go func() {
		l.sampleCPU()
		close(sampled)
	}()
	time.Sleep(50 * time.Millisecond) // the sample waits for the lock
	close(release)
	time.Sleep(20 * time.Millisecond) // the task waits for the lock

	// Other goroutines run, on the task's thread too if the task has let
	// go of it before untracking its run.
	var spinners sync.WaitGroup
	for range 4 {
		spinners.Add(1)
		go func() {
			defer spinners.Done()
			_ = spin(context.Background(), 60*time.Millisecond)
		}()
	}
	spinners.Wait()
	q.runsMu.Unlock()
	<-sampled
	if err := <-errs; err != nil {
		t.Fatal(err)
	}

	q.runsMu.Lock()
	finishedSince := time.Duration(q.cpu.finishedSince.Load())
	q.runsMu.Unlock()
	if finishedSince < 0 {
		t.Errorf("finishedSince = %v after a task finished, want >= 0: the sample read the thread's clock "+
			"after other goroutines ran on it, so cpuSampled exceeds the task's CPU time", finishedSince)
	}

	l.sampleCPU()
	if recent := math.Float64frombits(q.cpu.recent.Load()); recent < 0 {
		t.Errorf("recent CPU use = %.3f cores after the task finished, want >= 0", recent)
	}
}
