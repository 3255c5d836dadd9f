//go:build !linux

package redistest

import "os/exec"

// setParentDeathSignal does nothing, because this package sets a parent death
// signal only on Linux.
//
// NOTE: on other systems, a test process that dies without calling Close
// leaves redis-server running.
func setParentDeathSignal(cmd *exec.Cmd) {}
