//go:build linux

package threadcpu

import (
	"errors"
	"runtime"
	"sync"
	"testing"
	"time"

	"golang.org/x/sys/unix"
)

// taskDuration is how long the test tasks spin or sleep, in CPU time for
// spinProcessCPU and in wall-clock time for spin and time.Sleep.
const taskDuration = 200 * time.Millisecond

// spin keeps the calling goroutine busy for d of wall-clock time.
func spin(d time.Duration) {
	deadline := time.Now().Add(d)
	for time.Now().Before(deadline) {
	}
}

// spinProcessCPU keeps the calling goroutine busy until the process has
// used d of CPU time, so that a loaded machine makes the spin longer in
// wall-clock time but not shorter in CPU time. It gives up after 10 seconds
// of wall-clock time.
func spinProcessCPU(tb testing.TB, d time.Duration) {
	tb.Helper()
	target := processCPU(tb) + d
	deadline := time.Now().Add(10 * time.Second)
	for processCPU(tb) < target && time.Now().Before(deadline) {
	}
}

// processCPU returns the CPU time that all threads of the process have used.
func processCPU(tb testing.TB) time.Duration {
	tb.Helper()
	var ts unix.Timespec
	if err := unix.ClockGettime(unix.CLOCK_PROCESS_CPUTIME_ID, &ts); err != nil {
		tb.Fatalf("read CLOCK_PROCESS_CPUTIME_ID: %v", err)
	}
	return time.Duration(ts.Nano())
}

// measurement is what measure observed around one task.
type measurement struct {
	// cpu is the CPU time that Unlock returned.
	cpu time.Duration
	// wall is the wall-clock time from before Lock to after Unlock.
	wall time.Duration
	// process is the CPU time that the whole process used from before Lock
	// to after Unlock, which is at least cpu.
	process time.Duration
}

// measure runs task between Lock and Unlock on the calling goroutine.
func measure(t *testing.T, task func()) measurement {
	t.Helper()
	processStart := processCPU(t)
	start := time.Now()
	thread, err := Lock()
	if err != nil {
		t.Fatalf("Lock: %v", err)
	}
	task()
	cpu, err := thread.Unlock()
	if err != nil {
		t.Fatalf("Unlock: %v", err)
	}
	wall := time.Since(start)
	process := processCPU(t) - processStart
	t.Logf("thread %d: CPU time %v in %v of wall-clock time, process CPU time %v", thread.TID, cpu, wall, process)
	return measurement{cpu: cpu, wall: wall, process: process}
}

func TestSupported(t *testing.T) {
	if !Supported() {
		t.Error("Supported() = false on Linux, want true")
	}
}

func TestLockReturnsCallingThread(t *testing.T) {
	thread, err := Lock()
	if err != nil {
		t.Fatalf("Lock: %v", err)
	}
	defer thread.Unlock()
	if tid := unix.Gettid(); thread.TID != tid {
		t.Errorf("Lock().TID = %d, want the calling thread %d", thread.TID, tid)
	}
}

func TestUnlockSpinningTask(t *testing.T) {
	m := measure(t, func() { spinProcessCPU(t, taskDuration) })
	if minimum := taskDuration * 3 / 4; m.cpu < minimum {
		t.Errorf("Unlock() = %v after the process used %v of CPU time, want at least %v", m.cpu, m.process, minimum)
	}
	if m.cpu > m.process {
		t.Errorf("Unlock() = %v, want at most the %v of CPU time that the whole process used", m.cpu, m.process)
	}
	if m.cpu > m.wall {
		t.Errorf("Unlock() = %v, want at most the %v of wall-clock time around Lock and Unlock", m.cpu, m.wall)
	}
}

func TestUnlockSleepingTask(t *testing.T) {
	m := measure(t, func() { time.Sleep(taskDuration) })
	if maximum := 20 * time.Millisecond; m.cpu >= maximum {
		t.Errorf("Unlock() = %v after sleeping for %v, want less than %v", m.cpu, m.wall, maximum)
	}
}

func TestLockAgainSubtractsEarlierTask(t *testing.T) {
	// The second task may get the same thread, whose clock already counts
	// the first task, and must still measure only the sleep.
	measure(t, func() { spinProcessCPU(t, taskDuration/2) })
	m := measure(t, func() { time.Sleep(taskDuration / 2) })
	if maximum := 20 * time.Millisecond; m.cpu >= maximum {
		t.Errorf("Unlock() = %v for the sleeping task after a spinning task, want less than %v", m.cpu, maximum)
	}
}

// startSpinner starts a goroutine that locks its thread and spins until stop
// is called. stop unlocks the thread and returns the CPU time that Unlock
// reports.
func startSpinner(tb testing.TB) (thread Thread, stop func() time.Duration) {
	tb.Helper()
	threads := make(chan Thread)
	errs := make(chan error, 1)
	done := make(chan struct{})
	results := make(chan time.Duration, 1)
	go func() {
		thread, err := Lock()
		if err != nil {
			errs <- err
			return
		}
		threads <- thread
		for {
			select {
			case <-done:
				cpu, err := thread.Unlock()
				if err != nil {
					errs <- err
					return
				}
				results <- cpu
				return
			default:
			}
		}
	}()

	select {
	case thread = <-threads:
	case err := <-errs:
		tb.Fatalf("Lock in spinning goroutine: %v", err)
	}
	stop = func() time.Duration {
		close(done)
		select {
		case cpu := <-results:
			return cpu
		case err := <-errs:
			tb.Fatalf("Unlock in spinning goroutine: %v", err)
			return 0
		}
	}
	return thread, stop
}

func TestUsedGrowsWhileTaskSpins(t *testing.T) {
	processStart := processCPU(t)
	thread, stop := startSpinner(t)
	var readings []time.Duration
	for range 4 {
		time.Sleep(taskDuration / 4)
		used, err := thread.Used()
		if err != nil {
			stop()
			t.Fatalf("Used: %v", err)
		}
		readings = append(readings, used)
	}
	final := stop()
	process := processCPU(t) - processStart
	t.Logf("Used readings %v, Unlock %v, process CPU time %v", readings, final, process)

	for i := 1; i < len(readings); i++ {
		if readings[i] <= readings[i-1] {
			t.Errorf("Used() = %v after %v, want it to grow while the task spins", readings[i], readings[i-1])
		}
	}
	if last := readings[len(readings)-1]; final < last {
		t.Errorf("Unlock() = %v, want at least the last Used() reading %v", final, last)
	}
	if final > process {
		t.Errorf("Unlock() = %v, want at most the %v of CPU time that the whole process used", final, process)
	}
	// The test goroutine sleeps, so the spinning thread uses nearly all of
	// the CPU time of the process.
	if minimum := process * 3 / 4; final < minimum {
		t.Errorf("Unlock() = %v, want at least %v, three quarters of the %v of CPU time that the process used", final, minimum, process)
	}
}

func TestUsedWhileTaskSleeps(t *testing.T) {
	threads := make(chan Thread)
	wake := make(chan struct{})
	go func() {
		thread, err := Lock()
		if err != nil {
			close(threads)
			return
		}
		threads <- thread
		<-wake
		thread.Unlock()
	}()
	thread, ok := <-threads
	if !ok {
		t.Fatal("Lock failed in the sleeping goroutine")
	}
	defer close(wake)

	time.Sleep(taskDuration / 2)
	used, err := thread.Used()
	if err != nil {
		t.Fatalf("Used: %v", err)
	}
	if maximum := 20 * time.Millisecond; used >= maximum {
		t.Errorf("Used() = %v for a task blocked on a channel, want less than %v", used, maximum)
	}
}

func TestConcurrentTasksMeasureOwnTime(t *testing.T) {
	const tasks = 2
	type result struct {
		tid       int
		cpu, wall time.Duration
		err       error
	}
	results := make([]result, tasks)
	processStart := processCPU(t)
	var wg sync.WaitGroup
	for i := range tasks {
		wg.Go(func() {
			start := time.Now()
			thread, err := Lock()
			if err != nil {
				results[i].err = err
				return
			}
			spin(taskDuration)
			results[i].tid = thread.TID
			results[i].cpu, results[i].err = thread.Unlock()
			results[i].wall = time.Since(start)
		})
	}
	wg.Wait()
	process := processCPU(t) - processStart

	var total time.Duration
	for i, r := range results {
		t.Logf("task %d: thread %d, CPU time %v in %v of wall-clock time", i, r.tid, r.cpu, r.wall)
		if r.err != nil {
			t.Fatalf("task %d: %v", i, r.err)
		}
		if r.cpu > r.wall {
			t.Errorf("task %d: Unlock() = %v, want at most its own %v of wall-clock time", i, r.cpu, r.wall)
		}
		if r.cpu <= 0 {
			t.Errorf("task %d: Unlock() = %v, want a positive CPU time", i, r.cpu)
		}
		total += r.cpu
	}
	t.Logf("tasks total %v, process CPU time %v", total, process)

	// If each task measured the time of both, the total would be about
	// twice the CPU time of the process.
	if total > process {
		t.Errorf("tasks measured %v in total, want at most the %v of CPU time that the whole process used", total, process)
	}
	if minimum := process * 3 / 4; total < minimum {
		t.Errorf("tasks measured %v in total, want at least %v, three quarters of the %v of CPU time that the process used", total, minimum, process)
	}
	if results[0].tid == results[1].tid {
		t.Errorf("both tasks report thread %d, want two different threads", results[0].tid)
	}
}

func TestNestedLockOSThreadKeepsThread(t *testing.T) {
	thread, err := Lock()
	if err != nil {
		t.Fatalf("Lock: %v", err)
	}

	// A handler that locks and unlocks the thread itself must leave the
	// goroutine locked, because the runtime counts nested calls.
	runtime.LockOSThread()
	runtime.UnlockOSThread()
	runtime.Gosched()

	if tid := unix.Gettid(); tid != thread.TID {
		t.Errorf("goroutine runs on thread %d after nested LockOSThread and UnlockOSThread, want %d", tid, thread.TID)
	}
	if _, err := thread.Unlock(); err != nil {
		t.Errorf("Unlock after nested LockOSThread and UnlockOSThread: %v", err)
	}
}

func TestUsedAfterThreadExits(t *testing.T) {
	thread := lockAndReturn(t)

	// The thread exits shortly after its goroutine returns.
	deadline := time.Now().Add(5 * time.Second)
	for {
		_, err := thread.Used()
		if errors.Is(err, ErrThreadExited) {
			t.Logf("Used() error: %v", err)
			return
		}
		if err != nil {
			t.Fatalf("Used() error = %v, want ErrThreadExited", err)
		}
		if time.Now().After(deadline) {
			t.Fatalf("Used() on thread %d still succeeds 5s after its locked goroutine returned, want ErrThreadExited", thread.TID)
		}
		time.Sleep(time.Millisecond)
	}
}

// lockAndReturn starts a goroutine that calls Lock and returns without
// Unlock, which makes the runtime end the thread, and returns that Thread.
func lockAndReturn(t *testing.T) Thread {
	t.Helper()
	return lockOffMainThread(t, false)
}

// lockOffMainThread starts a goroutine that calls Lock, then Release when
// release is true, and returns, and it returns that Thread. The runtime
// parks the main thread instead of ending it, so a goroutine that gets the
// main thread keeps it locked until the test ends, and lockOffMainThread
// starts another goroutine.
func lockOffMainThread(t *testing.T, release bool) Thread {
	t.Helper()
	pid := unix.Getpid()
	hold := make(chan struct{})
	t.Cleanup(func() { close(hold) })
	for range 2 {
		threads := make(chan Thread, 1)
		errs := make(chan error, 1)
		go func() {
			thread, err := Lock()
			if err != nil {
				errs <- err
				return
			}
			if thread.TID == pid {
				threads <- Thread{}
				<-hold
				thread.Unlock()
				return
			}
			if release {
				thread.Release()
			}
			threads <- thread
		}()
		select {
		case thread := <-threads:
			if thread.TID != 0 {
				return thread
			}
		case err := <-errs:
			t.Fatalf("Lock in the exiting goroutine: %v", err)
		}
	}
	t.Fatal("Lock returned the main thread twice, although the first goroutine still holds it")
	return Thread{}
}

func TestZeroThread(t *testing.T) {
	var thread Thread
	if _, err := thread.Used(); err == nil {
		t.Error("Thread{}.Used() returned no error, want an error")
	}
	if _, err := thread.Unlock(); err == nil {
		t.Error("Thread{}.Unlock() returned no error, want an error")
	}
}

func TestThreadClockIDMatchesOwnClock(t *testing.T) {
	thread, err := Lock()
	if err != nil {
		t.Fatalf("Lock: %v", err)
	}
	defer thread.Unlock()
	spin(10 * time.Millisecond)

	// Reading the same thread through its encoded clock ID and through
	// CLOCK_THREAD_CPUTIME_ID must give nearly the same time.
	before, err := readOwnClock()
	if err != nil {
		t.Fatalf("read CLOCK_THREAD_CPUTIME_ID: %v", err)
	}
	var ts unix.Timespec
	if err := unix.ClockGettime(threadClockID(thread.TID), &ts); err != nil {
		t.Fatalf("read clock %d of thread %d: %v", threadClockID(thread.TID), thread.TID, err)
	}
	after, err := readOwnClock()
	if err != nil {
		t.Fatalf("read CLOCK_THREAD_CPUTIME_ID: %v", err)
	}
	if encoded := time.Duration(ts.Nano()); encoded < before || encoded > after {
		t.Errorf("clock of thread %d read %v, want between %v and %v from CLOCK_THREAD_CPUTIME_ID", thread.TID, encoded, before, after)
	}
}

func BenchmarkLockUnlock(b *testing.B) {
	for b.Loop() {
		thread, err := Lock()
		if err != nil {
			b.Fatal(err)
		}
		if _, err := thread.Unlock(); err != nil {
			b.Fatal(err)
		}
	}
}

// BenchmarkUsed reads the clock of a locked thread in two states: spinning,
// as a sampler finds a CPU-bound task, and blocked on a channel.
func BenchmarkUsed(b *testing.B) {
	b.Run("spinning", func(b *testing.B) {
		thread, stop := startSpinner(b)
		defer stop()
		for b.Loop() {
			if _, err := thread.Used(); err != nil {
				b.Fatal(err)
			}
		}
	})
	b.Run("blocked", func(b *testing.B) {
		threads := make(chan Thread)
		wake := make(chan struct{})
		go func() {
			thread, err := Lock()
			if err != nil {
				close(threads)
				return
			}
			threads <- thread
			<-wake
			thread.Unlock()
		}()
		thread, ok := <-threads
		if !ok {
			b.Fatal("Lock failed in the blocked goroutine")
		}
		defer close(wake)
		for b.Loop() {
			if _, err := thread.Used(); err != nil {
				b.Fatal(err)
			}
		}
	})
}

// BenchmarkBlockingWhileLocked measures one round trip over unbuffered
// channels with a goroutine that is locked to its thread and with one that
// is not. The difference is the extra cost of each block and wake-up of a
// task while Lock holds its thread.
func BenchmarkBlockingWhileLocked(b *testing.B) {
	for _, locked := range []bool{false, true} {
		name := "unlocked"
		if locked {
			name = "locked"
		}
		b.Run(name, func(b *testing.B) {
			requests := make(chan struct{})
			replies := make(chan struct{})
			go func() {
				for range requests {
					replies <- struct{}{}
				}
			}()
			defer close(requests)
			if locked {
				thread, err := Lock()
				if err != nil {
					b.Fatal(err)
				}
				defer thread.Unlock()
			}
			for b.Loop() {
				requests <- struct{}{}
				<-replies
			}
		})
	}
}

func TestReleaseKeepsThread(t *testing.T) {
	thread := lockOffMainThread(t, true)

	// A goroutine that returns while locked ends its thread, as
	// TestUsedAfterThreadExits shows. After Release the thread goes back to
	// the runtime and keeps running.
	time.Sleep(100 * time.Millisecond)
	if _, err := thread.Used(); err != nil {
		t.Errorf("Used() on thread %d 100ms after its goroutine released it and returned: %v, want the thread alive", thread.TID, err)
	}
}
