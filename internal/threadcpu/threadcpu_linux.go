//go:build linux

package threadcpu

import (
	"errors"
	"fmt"
	"runtime"
	"time"
	"unsafe"

	"golang.org/x/sys/unix"
)

// Supported reports whether this platform measures thread CPU time. It
// returns true on Linux.
func Supported() bool {
	return true
}

// Lock locks the calling goroutine to its OS thread with
// runtime.LockOSThread and returns the thread with its CPU time so far. The
// caller must call Unlock on the same goroutine when the task ends, with
// defer so that it also runs when the task panics, because the runtime ends
// a thread whose goroutine returns while locked. When Lock returns an error,
// it has already undone the lock.
func Lock() (Thread, error) {
	runtime.LockOSThread()
	tid := unix.Gettid()
	start, err := readOwnClock()
	if err != nil {
		runtime.UnlockOSThread()
		return Thread{}, fmt.Errorf("threadcpu: lock thread %d: read CLOCK_THREAD_CPUTIME_ID: %w", tid, err)
	}
	return Thread{TID: tid, start: start}, nil
}

// Unlock returns the CPU time that the thread has used since Lock, and then
// unlocks the goroutine with runtime.UnlockOSThread. It must be called on
// the goroutine that called Lock.
//
// Unlock reads the clock of thread t.TID rather than the clock of the thread
// it runs on, so that it costs one system call instead of two with gettid.
// It therefore does not notice when it runs on another thread: the result is
// then the CPU time of t.TID, and the runtime.UnlockOSThread applies to the
// calling goroutine. When reading the clock fails, it still unlocks and
// returns the error.
func (t Thread) Unlock() (time.Duration, error) {
	if t.TID == 0 {
		return 0, errZeroThread
	}
	now, err := t.clock()
	runtime.UnlockOSThread()
	if err != nil {
		return 0, fmt.Errorf("threadcpu: unlock: %w", err)
	}
	return now - t.start, nil
}

// Release unlocks the goroutine with runtime.UnlockOSThread without reading
// the clock. A caller that needs the final CPU time and must keep the thread
// to itself until it has recorded it calls Used, records the result, and
// then calls Release on the goroutine that called Lock.
func (t Thread) Release() {
	if t.TID != 0 {
		runtime.UnlockOSThread()
	}
}

// Used returns the CPU time that the thread has used since Lock. Any
// goroutine may call it while the task runs, and between Lock and Unlock the
// result never decreases. After Unlock the thread may run other goroutines,
// whose CPU time Used would count, so the caller must stop calling Used when
// the task ends.
//
// Used reads the thread's clock with clock_gettime(2) and the clock ID that
// pthread_getcpuclockid(3) would return. That costs one system call, and the
// result includes the thread's current time slice. The first field of
// /proc/self/task/TID/schedstat is the same counter, but the kernel updates
// it for a running thread only at scheduler ticks and context switches. In a
// test on Linux 6.18 it lagged the clock by up to 4 ms, and reading it cost
// three system calls and about 9 times as long.
//
// When the thread no longer exists, Used returns an error that wraps
// ErrThreadExited.
//
// NOTE: the kernel reuses thread IDs. If the locked goroutine returned without
// Unlock, the runtime ended its thread, and a new thread of this process got
// the same ID, Used reads the new thread's clock without an error.
func (t Thread) Used() (time.Duration, error) {
	if t.TID == 0 {
		return 0, errZeroThread
	}
	now, err := t.clock()
	if err != nil {
		return 0, usedError(err)
	}
	return now - t.start, nil
}

// usedError returns the error of Used, apart so that Used keeps a small
// frame.
//
//go:noinline
func usedError(err error) error {
	return fmt.Errorf("threadcpu: %w", err)
}

// errZeroThread is returned by the methods of the zero Thread.
var errZeroThread = errors.New("threadcpu: invalid Thread with TID 0: use the Thread that Lock returned")

// readOwnClock returns the CPU time of the calling thread.
func readOwnClock() (time.Duration, error) {
	var ts unix.Timespec
	if errno := clockGettime(unix.CLOCK_THREAD_CPUTIME_ID, &ts); errno != 0 {
		return 0, errno
	}
	return time.Duration(ts.Nano()), nil
}

// clockGettime is unix.ClockGettime without telling the scheduler about the
// system call. Reading a CPU clock never blocks, so the scheduler has nothing
// to do, and skipping its bookkeeping saved about 0.1 µs of the 0.65 µs that
// each read cost on the machine that docs/benchmarks.md describes. Every
// task with CPU accounting reads the clock twice.
func clockGettime(clock int32, ts *unix.Timespec) unix.Errno {
	_, _, errno := unix.RawSyscall(unix.SYS_CLOCK_GETTIME, uintptr(clock), uintptr(unsafe.Pointer(ts)), 0)
	return errno
}

// threadClockID returns the clock ID of the scheduler CPU clock of thread tid,
// the value that pthread_getcpuclockid(3) returns. The kernel encodes the
// bitwise complement of the thread ID in the upper 29 bits, sets bit 2 for a
// per-thread clock and puts CPUCLOCK_SCHED (2) in bits 0 and 1, as
// MAKE_THREAD_CPUCLOCK in the kernel's include/linux/posix-timers.h defines.
// clock_gettime(2) accepts such an ID only for threads of the calling
// process and returns EINVAL for any other ID.
func threadClockID(tid int) int32 {
	const (
		perThread     = 4
		schedulerTime = 2
	)
	return ^int32(tid)<<3 | perThread | schedulerTime
}

// clock returns the CPU time of thread t.TID since the thread started.
// The error paths are in clockError, so that clock and its callers keep
// small frames. They run on the stack of the task's goroutine, which starts
// small, and a deeper call here makes the runtime grow that stack for every
// task.
func (t Thread) clock() (time.Duration, error) {
	var ts unix.Timespec
	if errno := clockGettime(threadClockID(t.TID), &ts); errno != 0 {
		return 0, clockError(t.TID, errno)
	}
	return time.Duration(ts.Nano()), nil
}

// clockError returns the error of a failed read of thread tid's clock.
//
//go:noinline
func clockError(tid int, errno unix.Errno) error {
	if errno == unix.EINVAL {
		return fmt.Errorf("read CPU clock of thread %d: %w: call Used only between Lock and Unlock, because a locked thread exits when its goroutine returns without calling Unlock",
			tid, ErrThreadExited)
	}
	return fmt.Errorf("read CPU clock of thread %d: %w", tid, errno)
}
