// Package resource measures the memory and CPU use of this process and the
// limits that apply to it, for a pressure controller that sheds work before
// the process runs out of either.
package resource

import (
	"fmt"
	"math"
	"runtime"

	"github.com/shirou/gopsutil/v4/mem"
)

// Sources of a host limit, as stored in Limits.MemorySource and
// Limits.CPUSource.
const (
	sourceHostMemory = "host memory"
	sourceGOMAXPROCS = "GOMAXPROCS"
	sourceNumCPU     = "runtime.NumCPU"
)

// Limits are the memory and CPU limits that apply to this process, and where
// each came from.
type Limits struct {
	// MemoryBytes is the memory limit in bytes. It is never 0 when
	// DetectLimits returns no error, because the host's RAM is the last
	// fallback.
	MemoryBytes int64
	// MemorySource names where MemoryBytes came from: "cgroup v2 memory.max",
	// "cgroup v1 memory.limit_in_bytes" or "host memory", the total RAM of
	// the machine. When a cgroup limit exceeds the host's RAM, the source is
	// "host memory (smaller than <cgroup source>)".
	MemorySource string
	// CPUCores is the CPU limit in cores, and may be fractional: a cgroup
	// quota of 50 ms per 100 ms period is 0.5 cores. It is never 0 when
	// DetectLimits returns no error, because GOMAXPROCS is the last fallback.
	CPUCores float64
	// CPUSource names where CPUCores came from: "cgroup v2 cpu.max",
	// "cgroup v1 cpu.cfs_quota_us" or "GOMAXPROCS". When a cgroup quota
	// exceeds the CPUs this process may run on, the source is
	// "runtime.NumCPU (smaller than <cgroup source>)".
	CPUSource string
}

// hostLimits are the machine-wide values that bound or replace the cgroup
// limits.
type hostLimits struct {
	// memoryBytes is the total RAM of the machine in bytes.
	memoryBytes int64
	// gomaxprocs is runtime.GOMAXPROCS(0).
	gomaxprocs int
	// numCPU is runtime.NumCPU(), the number of logical CPUs in this
	// process's CPU affinity mask at startup.
	numCPU int
}

// DetectLimits returns the memory and CPU limits that apply to this process.
//
// On Linux it reads this process's cgroup from /proc/self/cgroup, finds its
// directory through /proc/self/mountinfo, and takes the smallest limit of
// that cgroup and each ancestor visible in the mount. It tries cgroup v2
// (memory.max, cpu.max) before cgroup v1 (memory.limit_in_bytes,
// cpu.cfs_quota_us / cpu.cfs_period_us). Without a cgroup memory limit it
// uses the host's total RAM from gopsutil mem.VirtualMemory. A cgroup limit
// above the host's RAM, or above runtime.NumCPU cores, is lowered to it.
//
// Without a cgroup CPU limit it uses runtime.GOMAXPROCS(0). Since Go 1.25
// the default GOMAXPROCS already follows the container: it is the smaller
// of the number of CPUs this process may run on and the leaf cgroup's CPU
// limit, rounded up to a whole number of at least 2. Where no cgroup limit
// exists it is the CPU count, unless the GOMAXPROCS environment variable or
// a runtime.GOMAXPROCS call set another value.
//
// Other systems have no cgroups, so DetectLimits returns the host's RAM and
// GOMAXPROCS there. The limits are read once: a change to the cgroup while
// the process runs needs a new call. On error the Limits are zero.
func DetectLimits() (Limits, error) {
	host, err := readHostLimits()
	if err != nil {
		return Limits{}, err
	}
	return detectPlatformLimits(host)
}

// readHostLimits reads the machine's total RAM and the CPU counts of the Go
// runtime.
func readHostLimits() (hostLimits, error) {
	memory, err := mem.VirtualMemory()
	if err != nil {
		return hostLimits{}, fmt.Errorf("read total host memory: %w", err)
	}
	if memory.Total == 0 || memory.Total > math.MaxInt64 {
		return hostLimits{}, fmt.Errorf("invalid total host memory of %d bytes from gopsutil mem.VirtualMemory", memory.Total)
	}
	host := hostLimits{
		memoryBytes: int64(memory.Total),
		gomaxprocs:  runtime.GOMAXPROCS(0),
		numCPU:      runtime.NumCPU(),
	}
	return host, nil
}

// detectLimitsFrom returns the limits of the cgroups described by the /proc
// and /sys trees under root, bounded by or replaced with host.
func detectLimitsFrom(root string, host hostLimits) (Limits, error) {
	limits, err := readCgroupLimits(root)
	if err != nil {
		return Limits{}, fmt.Errorf("detect cgroup limits: %w", err)
	}
	return applyHostLimits(limits, host), nil
}

// applyHostLimits fills the limits no cgroup set from host, and lowers a
// cgroup limit that the machine itself cannot reach.
func applyHostLimits(limits Limits, host hostLimits) Limits {
	switch {
	case limits.MemoryBytes == 0:
		limits.MemoryBytes = host.memoryBytes
		limits.MemorySource = sourceHostMemory
	case host.memoryBytes > 0 && host.memoryBytes < limits.MemoryBytes:
		limits.MemorySource = fmt.Sprintf("%s (smaller than %s)", sourceHostMemory, limits.MemorySource)
		limits.MemoryBytes = host.memoryBytes
	}

	switch {
	case limits.CPUCores == 0:
		limits.CPUCores = float64(host.gomaxprocs)
		limits.CPUSource = sourceGOMAXPROCS
	case host.numCPU > 0 && float64(host.numCPU) < limits.CPUCores:
		limits.CPUSource = fmt.Sprintf("%s (smaller than %s)", sourceNumCPU, limits.CPUSource)
		limits.CPUCores = float64(host.numCPU)
	}
	return limits
}
