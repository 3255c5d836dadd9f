package resource

import (
	"math"
	"runtime"
	"runtime/debug"
	"testing"
	"time"
)

func newTestSampler(t testing.TB) *ProcessSampler {
	t.Helper()
	sampler, err := NewProcessSampler()
	if err != nil {
		t.Fatal(err)
	}
	return sampler
}

func takeSample(t testing.TB, sampler Sampler) Sample {
	t.Helper()
	sample, err := sampler.Sample()
	if err != nil {
		t.Fatal(err)
	}
	return sample
}

func TestProcessSamplerSane(t *testing.T) {
	sampler := newTestSampler(t)
	before := time.Now()
	sample := takeSample(t, sampler)
	t.Logf("sample: %+v", sample)

	if sample.At.Before(before) || sample.At.After(time.Now()) {
		t.Errorf("At = %v, want between %v and now", sample.At, before)
	}
	if sample.RSS <= 0 {
		t.Errorf("RSS = %d, want > 0", sample.RSS)
	}
	if sample.CPUTime < 0 {
		t.Errorf("CPUTime = %v, want >= 0", sample.CPUTime)
	}
	if sample.GoHeap <= 0 {
		t.Errorf("GoHeap = %d, want > 0", sample.GoHeap)
	}
	if sample.GoTotal < sample.GoHeap {
		t.Errorf("GoTotal = %d, want >= GoHeap %d", sample.GoTotal, sample.GoHeap)
	}
}

// TestProcessSamplerRSSGrows must not run in parallel with other tests,
// because memory that they free could hide the growth.
func TestProcessSamplerRSSGrows(t *testing.T) {
	const size = 64 << 20
	sampler := newTestSampler(t)
	// Return free heap pages to the operating system, so that the
	// allocation below needs new resident pages.
	debug.FreeOSMemory()
	before := takeSample(t, sampler)

	buffer := make([]byte, size)
	// A page becomes resident only when it is written.
	for i := 0; i < len(buffer); i += 4096 {
		buffer[i] = 1
	}
	after := takeSample(t, sampler)
	runtime.KeepAlive(buffer)

	growth := after.RSS - before.RSS
	t.Logf("RSS %d -> %d bytes, GoHeap %d -> %d bytes", before.RSS, after.RSS, before.GoHeap, after.GoHeap)
	if growth < size*3/4 {
		t.Errorf("RSS grew by %d bytes after touching %d bytes, want at least %d", growth, size, size*3/4)
	}
	if after.GoHeap < size {
		t.Errorf("GoHeap = %d bytes while a %d-byte buffer is live, want at least %d", after.GoHeap, size, size)
	}
}

func TestProcessSamplerCPUTimeGrows(t *testing.T) {
	const spin = 200 * time.Millisecond
	sampler := newTestSampler(t)
	before := takeSample(t, sampler)

	// Spin until the process has used spin of CPU time, with a wall clock
	// deadline for a loaded machine that gives this goroutine little CPU.
	deadline := time.Now().Add(10 * time.Second)
	var after Sample
	for {
		spinFor(20 * time.Millisecond)
		after = takeSample(t, sampler)
		if after.CPUTime-before.CPUTime >= spin {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("CPUTime grew by %v in 10 s of spinning, want at least %v", after.CPUTime-before.CPUTime, spin)
		}
	}

	cores := CPUCores(before, after)
	t.Logf("CPUTime %v -> %v over %v: %.2f cores", before.CPUTime, after.CPUTime, after.At.Sub(before.At), cores)
	if cores <= 0 {
		t.Errorf("CPUCores = %v, want > 0", cores)
	}
	// One spinning goroutine plus the runtime's background work stays well
	// below every CPU plus one.
	if limit := float64(runtime.NumCPU() + 1); cores > limit {
		t.Errorf("CPUCores = %v, want at most %v", cores, limit)
	}
}

// spinFor keeps one CPU busy for d of wall time.
func spinFor(d time.Duration) {
	end := time.Now().Add(d)
	x := 1.0
	for time.Now().Before(end) {
		for range 1000 {
			x = math.Sqrt(x + 1)
		}
	}
	spinSink = x
}

// spinSink keeps the compiler from removing spinFor's loop.
var spinSink float64

func TestCPUCores(t *testing.T) {
	start := time.Date(2025, 1, 2, 3, 4, 5, 0, time.UTC)
	sample := func(at time.Duration, cpu time.Duration) Sample {
		return Sample{At: start.Add(at), CPUTime: cpu}
	}
	tests := []struct {
		name      string
		prev, cur Sample
		want      float64
	}{
		{"idle", sample(0, time.Second), sample(time.Second, time.Second), 0},
		{"one core", sample(0, 3*time.Second), sample(time.Second, 4*time.Second), 1},
		{"half core", sample(0, 0), sample(250*time.Millisecond, 125*time.Millisecond), 0.5},
		{"several cores", sample(time.Second, 10*time.Second), sample(3*time.Second, 15*time.Second), 2.5},
		{"same time", sample(time.Second, 0), sample(time.Second, time.Second), 0},
		{"samples swapped", sample(2*time.Second, 2*time.Second), sample(time.Second, time.Second), 0},
		{"CPU time lower", sample(0, 2*time.Second), sample(time.Second, time.Second), 0},
	}
	for _, test := range tests {
		t.Run(test.name, func(t *testing.T) {
			got := CPUCores(test.prev, test.cur)
			if math.Abs(got-test.want) > 1e-9 {
				t.Errorf("CPUCores = %v, want %v", got, test.want)
			}
		})
	}
}

func TestSecondsToDuration(t *testing.T) {
	tests := []struct {
		seconds float64
		want    time.Duration
	}{
		{0, 0},
		{0.29, 290 * time.Millisecond},
		{0.01, 10 * time.Millisecond},
		{12.34, 12340 * time.Millisecond},
	}
	for _, test := range tests {
		if got := secondsToDuration(test.seconds); got != test.want {
			t.Errorf("secondsToDuration(%v) = %v, want %v", test.seconds, got, test.want)
		}
	}
}

func BenchmarkProcessSampler(b *testing.B) {
	sampler := newTestSampler(b)
	b.ReportAllocs()
	for b.Loop() {
		if _, err := sampler.Sample(); err != nil {
			b.Fatal(err)
		}
	}
}
