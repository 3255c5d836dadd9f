package asynqlimit

import (
	"errors"
	"log/slog"
	"math"
	"strings"
	"testing"
	"time"

	"github.com/google/go-cmp/cmp"
	"github.com/prometheus/client_golang/prometheus"
)

func TestProcessLimitsValidate(t *testing.T) {
	tests := []struct {
		name   string
		limits ProcessLimits
		want   []string
	}{
		{name: "zero value"},
		{name: "absolute", limits: ProcessLimits{MemorySoft: 300 << 20, MemoryHard: 400 << 20, CPUSoft: 1.5, CPUHard: 2}},
		{name: "fractions", limits: ProcessLimits{MemorySoftFraction: 0.7, MemoryHardFraction: 0.9, CPUHardFraction: 1}},
		{
			name:   "negative and NaN",
			limits: ProcessLimits{MemorySoft: -1, CPUHard: math.NaN(), Grace: -time.Second},
			want:   []string{"Process.MemorySoft", "Process.CPUHard", "Process.Grace"},
		},
		{
			name:   "fraction out of range",
			limits: ProcessLimits{MemoryHardFraction: 1.5, CPUSoftFraction: -0.1},
			want:   []string{"Process.MemoryHardFraction", "Process.CPUSoftFraction"},
		},
		{
			name:   "absolute and fraction",
			limits: ProcessLimits{MemoryHard: 1 << 30, MemoryHardFraction: 0.9},
			want:   []string{"Process.MemoryHardFraction"},
		},
		{
			name:   "soft above hard",
			limits: ProcessLimits{MemorySoft: 2, MemoryHard: 1, CPUSoftFraction: 0.9, CPUHardFraction: 0.5},
			want:   []string{"Process.MemorySoft", "Process.CPUSoftFraction"},
		},
		{
			name:   "infinite",
			limits: ProcessLimits{CPUHard: math.Inf(1)},
			want:   []string{"Process.CPUHard"},
		},
		{
			name:   "hysteresis of one",
			limits: ProcessLimits{Hysteresis: 1},
			want:   []string{"Process.Hysteresis"},
		},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			var got []string
			for _, f := range tt.limits.validate("Process") {
				got = append(got, f.Path)
			}
			if diff := cmp.Diff(tt.want, got); diff != "" {
				t.Errorf("invalid field paths (-want +got):\n%s", diff)
			}
		})
	}
}

func TestProcessLimitsResolve(t *testing.T) {
	p := ProcessLimits{MemorySoft: 300, MemoryHardFraction: 0.5, CPUSoftFraction: 0.25, CPUHard: 3}
	memory, cpu := p.resolve(1000, 4, 100*time.Millisecond)
	if memory.soft != 300 || memory.hard != 500 {
		t.Errorf("memory thresholds = %v, %v; want 300, 500", memory.soft, memory.hard)
	}
	if cpu.soft != 1 || cpu.hard != 3 {
		t.Errorf("cpu thresholds = %v, %v; want 1, 3", cpu.soft, cpu.hard)
	}
	if memory.hysteresis != DefaultHysteresis || memory.grace != 50*time.Millisecond {
		// one 100ms interval, less half an interval of slack
		t.Errorf("defaults = %v, %s; want %v, 50ms",
			memory.hysteresis, memory.grace, DefaultHysteresis)
	}
	if (ProcessLimits{}).enabled() {
		t.Errorf("zero ProcessLimits is enabled, want off")
	}
	if !p.enabled() {
		t.Errorf("ProcessLimits with thresholds is off, want enabled")
	}
}

func TestNewRejectsSoftAboveHardOfMixedKinds(t *testing.T) {
	// testDetected has 1000 bytes and 4 cores: the hard thresholds resolve
	// to 500 bytes and 1 core, below the soft ones.
	_, err := New(Limits{
		Queues: map[string]Budget{"high": {Priority: 1}},
		Process: ProcessLimits{MemorySoft: 900, MemoryHardFraction: 0.5,
			CPUSoftFraction: 0.9, CPUHard: 1},
	}, withDetectedLimits(testDetected), WithRegisterer(prometheus.NewRegistry()))
	var cfg *ConfigError
	if !errors.As(err, &cfg) {
		t.Fatalf("New() error = %v, want a *ConfigError", err)
	}
	var got []string
	for _, f := range cfg.Fields {
		got = append(got, f.Path)
	}
	if diff := cmp.Diff([]string{"Process.MemorySoft", "Process.CPUSoft"}, got); diff != "" {
		t.Errorf("invalid field paths (-want +got):\n%s", diff)
	}
	if !strings.Contains(err.Error(), "900 bytes against 500 bytes") {
		t.Errorf("error %q does not name the resolved thresholds in bytes", err)
	}
}

func TestNewWarnsAboutIneffectiveProcessLimits(t *testing.T) {
	logs := &syncBuffer{}
	l, err := New(Limits{Process: ProcessLimits{MemorySoft: 500, MemoryHard: 2000, CPUSoft: 8}},
		withDetectedLimits(testDetected), WithSampler(&fakeSampler{}), WithSampleInterval(time.Hour),
		WithRegisterer(prometheus.NewRegistry()), WithLogger(slog.New(slog.NewTextHandler(logs, nil))))
	if err != nil {
		t.Fatal(err)
	}
	l.Close()
	for _, want := range []string{
		"Process.MemoryHard is 2000 bytes, above the detected limit of 1000 bytes",
		"Process.CPUSoft is 8 cores, above the detected limit of 4 cores",
		"every queue has the same Priority",
	} {
		if !strings.Contains(logs.String(), want) {
			t.Errorf("log has no warning %q:\n%s", want, logs)
		}
	}
	if strings.Contains(logs.String(), "MemorySoft is") {
		t.Errorf("log warns about MemorySoft, which is below the detected limit:\n%s", logs)
	}
}
