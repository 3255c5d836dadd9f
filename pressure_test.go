package asynqlimit

import (
	"testing"
	"time"
)

func TestThresholdLevels(t *testing.T) {
	type reading struct {
		after time.Duration // since the start
		value float64
		want  Pressure
	}
	tests := []struct {
		name     string
		th       threshold
		readings []reading
	}{
		{
			name: "soft needs the grace period",
			th:   threshold{soft: 100, hard: 200, hysteresis: 0.1, grace: time.Second},
			readings: []reading{
				{0, 50, PressureNone},
				{100 * time.Millisecond, 120, PressureNone},
				{600 * time.Millisecond, 120, PressureNone},
				{1100 * time.Millisecond, 120, PressureSoft},
			},
		},
		{
			name: "a dip restarts the grace period",
			th:   threshold{soft: 100, hard: 200, hysteresis: 0.1, grace: time.Second},
			readings: []reading{
				{0, 120, PressureNone},
				{500 * time.Millisecond, 95, PressureNone},
				{1000 * time.Millisecond, 120, PressureNone},
				{1500 * time.Millisecond, 120, PressureNone},
				{2000 * time.Millisecond, 120, PressureSoft},
			},
		},
		{
			name: "hard is immediate",
			th:   threshold{soft: 100, hard: 200, hysteresis: 0.1, grace: time.Second},
			readings: []reading{
				{0, 50, PressureNone},
				{10 * time.Millisecond, 250, PressureHard},
			},
		},
		{
			name: "hysteresis holds the level near the threshold",
			th:   threshold{soft: 100, hard: 200, hysteresis: 0.1, grace: time.Second},
			readings: []reading{
				{0, 120, PressureNone},
				{time.Second, 120, PressureSoft},
				{2 * time.Second, 95, PressureSoft}, // below soft, above 90
				{4 * time.Second, 91, PressureSoft},
				{5 * time.Second, 85, PressureSoft}, // below 90: the fall starts
				{5500 * time.Millisecond, 85, PressureSoft},
				{6 * time.Second, 85, PressureNone},
			},
		},
		{
			name: "hard falls one level at a time",
			th:   threshold{soft: 100, hard: 200, hysteresis: 0.1, grace: time.Second},
			readings: []reading{
				{0, 250, PressureHard},
				{time.Second, 10, PressureHard},
				{2 * time.Second, 10, PressureSoft},
				{3 * time.Second, 10, PressureSoft}, // the next fall starts here
				{4 * time.Second, 10, PressureNone},
			},
		},
		{
			name: "zero grace rises and falls at once",
			th:   threshold{soft: 100, hard: 200},
			readings: []reading{
				{0, 100, PressureSoft},
				{time.Millisecond, 99, PressureNone},
			},
		},
		{
			name: "disabled thresholds",
			th:   threshold{},
			readings: []reading{
				{0, 1e18, PressureNone},
			},
		},
		{
			name: "hard only",
			th:   threshold{hard: 200, grace: time.Second},
			readings: []reading{
				{0, 150, PressureNone},
				{time.Second, 210, PressureHard},
				{2 * time.Second, 100, PressureHard},
				{3 * time.Second, 100, PressureNone},
			},
		},
	}
	start := time.Unix(1000, 0)
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			th := tt.th
			for _, r := range tt.readings {
				if got := th.update(r.value, start.Add(r.after)); got != r.want {
					t.Fatalf("update(%v) at +%s = %s, want %s", r.value, r.after, got, r.want)
				}
			}
		})
	}
}

func TestShedLadder(t *testing.T) {
	l := newShedLadder([]int{0, 2, 1, 1, 5})
	steps := []struct {
		pressure bool
		maxShed  int
		shedding bool
	}{
		{false, 0, false},
		{true, 0, true},
		{true, 1, true},
		{true, 2, true},
		{true, 2, true}, // 5 is the highest and never shed
		{false, 1, true},
		{false, 0, true},
		{false, 0, false},
		{false, 0, false},
	}
	for i, s := range steps {
		maxShed, shedding := l.step(s.pressure)
		if maxShed != s.maxShed || shedding != s.shedding {
			t.Fatalf("step %d (pressure %v) = %d, %v; want %d, %v", i, s.pressure, maxShed, shedding, s.maxShed, s.shedding)
		}
	}
}

func TestShedLadderOnePriority(t *testing.T) {
	l := newShedLadder([]int{3, 3})
	if _, shedding := l.step(true); shedding {
		t.Errorf("step(true) with one priority sheds, want the highest priority never shed")
	}
	empty := newShedLadder(nil)
	if _, shedding := empty.step(true); shedding {
		t.Errorf("step(true) with no queues sheds")
	}
}

func TestPressureString(t *testing.T) {
	for p, want := range map[Pressure]string{PressureNone: "none", PressureSoft: "soft", PressureHard: "hard", Pressure(7): "Pressure(7)"} {
		if got := p.String(); got != want {
			t.Errorf("Pressure(%d).String() = %q, want %q", int(p), got, want)
		}
	}
}
