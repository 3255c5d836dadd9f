package resource

import (
	"fmt"
	"math"
	"os"
	"runtime/metrics"
	"slices"
	"sync"
	"time"

	"github.com/shirou/gopsutil/v4/process"
)

// Names of the runtime/metrics read by ProcessSampler.
const (
	metricGoHeap  = "/memory/classes/heap/objects:bytes"
	metricGoTotal = "/memory/classes/total:bytes"
)

// Sample is one reading of this process's memory and CPU use.
type Sample struct {
	// At is the time the sample was taken. It carries a monotonic clock reading,
	// so CPUCores measures the interval between samples correctly across
	// wall clock changes.
	At time.Time
	// RSS is the resident set size in bytes: the process's memory that is
	// in RAM, including memory mapped by cgo and by other non-Go code.
	RSS int64
	// CPUTime is the user plus system CPU time that all threads of the
	// process have used since it started. On Linux it advances in whole
	// clock ticks, 10 ms at the usual USER_HZ of 100.
	CPUTime time.Duration
	// GoHeap is the bytes of heap objects, both live ones and dead ones that
	// the garbage collector has not freed yet, from the runtime/metrics
	// metric /memory/classes/heap/objects:bytes.
	GoHeap int64
	// GoTotal is the bytes of memory that the Go runtime has mapped
	// read-write, from /memory/classes/total:bytes. It includes memory that
	// was released to the operating system and so is not part of RSS, and
	// excludes memory mapped by cgo or the syscall package.
	GoTotal int64
}

// Sampler takes samples of a process's memory and CPU use.
type Sampler interface {
	// Sample takes a new sample.
	Sample() (Sample, error)
}

// ProcessSampler takes samples of this process through gopsutil and
// runtime/metrics. It is safe for concurrent use.
type ProcessSampler struct {
	process *process.Process

	// mu guards metricSamples, which Sample reuses so that it allocates
	// nothing for the runtime metrics.
	mu            sync.Mutex
	metricSamples []metrics.Sample
}

var _ Sampler = (*ProcessSampler)(nil)

// NewProcessSampler returns a sampler of the current process. It fails if
// gopsutil cannot open the process or the Go runtime lacks one of the
// memory metrics.
func NewProcessSampler() (*ProcessSampler, error) {
	pid := os.Getpid()
	proc, err := process.NewProcess(int32(pid))
	if err != nil {
		return nil, fmt.Errorf("open process %d for sampling: %w", pid, err)
	}

	names := []string{metricGoHeap, metricGoTotal}
	for _, name := range names {
		supported := slices.ContainsFunc(metrics.All(), func(d metrics.Description) bool {
			return d.Name == name && d.Kind == metrics.KindUint64
		})
		if !supported {
			return nil, fmt.Errorf("runtime metric %s is not supported by this Go version as a uint64", name)
		}
	}
	metricSamples := make([]metrics.Sample, len(names))
	for i, name := range names {
		metricSamples[i].Name = name
	}
	return &ProcessSampler{process: proc, metricSamples: metricSamples}, nil
}

// Sample reads the process's resident memory and CPU time with gopsutil,
// which on Linux reads /proc/<pid>/statm, /proc/<pid>/stat and, for the boot
// time, /proc/stat. It reads the Go memory metrics with runtime/metrics.
func (s *ProcessSampler) Sample() (Sample, error) {
	at := time.Now()
	memory, err := s.process.MemoryInfo()
	if err != nil {
		return Sample{}, fmt.Errorf("read resident memory of process %d: %w", s.process.Pid, err)
	}
	times, err := s.process.Times()
	if err != nil {
		return Sample{}, fmt.Errorf("read CPU time of process %d: %w", s.process.Pid, err)
	}

	s.mu.Lock()
	defer s.mu.Unlock()
	metrics.Read(s.metricSamples)
	goHeap := s.metricSamples[0].Value.Uint64()
	goTotal := s.metricSamples[1].Value.Uint64()

	if memory.RSS > math.MaxInt64 || goHeap > math.MaxInt64 || goTotal > math.MaxInt64 {
		return Sample{}, fmt.Errorf("invalid memory reading of process %d: RSS %d, Go heap %d or Go total %d bytes exceeds the int64 range",
			s.process.Pid, memory.RSS, goHeap, goTotal)
	}
	sample := Sample{
		At:      at,
		RSS:     int64(memory.RSS),
		CPUTime: secondsToDuration(times.User + times.System),
		GoHeap:  int64(goHeap),
		GoTotal: int64(goTotal),
	}
	return sample, nil
}

// secondsToDuration converts seconds to a Duration, rounding to the nearest
// nanosecond so that 0.29 s becomes 290 ms instead of 289.999999 ms.
func secondsToDuration(seconds float64) time.Duration {
	return time.Duration(math.Round(seconds * float64(time.Second)))
}

// CPUCores returns the average cores used between two samples: the CPU time
// used divided by the time elapsed. One thread busy all the time is 1.0.
// It returns 0 if cur is not later than prev or its CPU time is lower.
// Because CPU time advances in whole clock ticks (10 ms on most Linux
// systems), the result over a 250 ms interval can be off by up to about
// 0.04 cores.
func CPUCores(prev, cur Sample) float64 {
	elapsed := cur.At.Sub(prev.At)
	used := cur.CPUTime - prev.CPUTime
	if elapsed <= 0 || used < 0 {
		return 0
	}
	return used.Seconds() / elapsed.Seconds()
}
