//go:build !linux

package threadcpu

import (
	"errors"
	"fmt"
	"runtime"
	"time"
)

// Supported reports whether this platform measures thread CPU time. It
// returns false on every system except Linux.
func Supported() bool {
	return false
}

// Lock returns an error that wraps errors.ErrUnsupported, because thread CPU
// time is measured only on Linux. It does not lock the goroutine.
func Lock() (Thread, error) {
	return Thread{}, errUnsupported()
}

// Unlock returns an error that wraps errors.ErrUnsupported, because Lock never
// succeeds on this system. It does not unlock the goroutine.
func (t Thread) Unlock() (time.Duration, error) {
	return 0, errUnsupported()
}

// Release does nothing, because Lock never succeeds on this system.
func (t Thread) Release() {}

// Used returns an error that wraps errors.ErrUnsupported, because Lock never
// succeeds on this system.
func (t Thread) Used() (time.Duration, error) {
	return 0, errUnsupported()
}

func errUnsupported() error {
	return fmt.Errorf("threadcpu: thread CPU time is measured only on Linux, not on %s: %w: check Supported before calling Lock",
		runtime.GOOS, errors.ErrUnsupported)
}
