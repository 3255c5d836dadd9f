package redistest

import (
	"os/exec"
	"syscall"
)

// setParentDeathSignal makes the kernel send SIGKILL to the child when the
// test process dies without calling Close, for example when go test ends it
// at its -timeout. Without it redis-server would keep running. launchRedis
// keeps the starting thread alive, which the signal depends on.
func setParentDeathSignal(cmd *exec.Cmd) {
	cmd.SysProcAttr = &syscall.SysProcAttr{Pdeathsig: syscall.SIGKILL}
}
