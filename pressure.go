package asynqlimit

import (
	"fmt"
	"slices"
	"time"
)

// Pressure is the level of process pressure on one resource: the value of
// the asynqlimit_pressure gauge.
type Pressure int

// The pressure levels.
const (
	// PressureNone means the resource is below its soft threshold.
	PressureNone Pressure = iota
	// PressureSoft sheds the lowest-priority queues.
	PressureSoft
	// PressureHard starts without the grace period and sheds as
	// PressureSoft does. Only hard memory pressure preempts. At each sample
	// at or above the hard memory threshold, it stops one running task
	// below the highest priority, from the lowest priority first. Hard CPU
	// pressure sheds but preempts nothing.
	PressureHard
)

// String returns "none", "soft" or "hard".
func (p Pressure) String() string {
	switch p {
	case PressureNone:
		return "none"
	case PressureSoft:
		return "soft"
	case PressureHard:
		return "hard"
	}
	return fmt.Sprintf("Pressure(%d)", int(p))
}

// threshold turns readings of one resource into a pressure level. Rising to
// soft needs the reading at or above the soft threshold for the whole grace
// period. Rising to hard is immediate, as kubelet treats its hard eviction
// thresholds. Falling a level needs the reading below that level's threshold
// minus the hysteresis for the whole grace period, so a reading that hovers
// at a threshold does not make the level flap.
type threshold struct {
	soft, hard float64 // 0 disables the level
	hysteresis float64 // fraction of the threshold
	grace      time.Duration

	level Pressure
	// riseSince and fallSince are the times of the first reading of the
	// current run above the next level or below the recovery line. Each is
	// zero while no such run is going on.
	riseSince time.Time
	fallSince time.Time
}

// update records a reading taken at now and returns the level.
func (th *threshold) update(value float64, now time.Time) Pressure {
	raw := th.rawLevel(value, 0)
	switch {
	case raw == PressureHard && th.level < PressureHard:
		th.set(PressureHard)
	case raw > th.level:
		th.fallSince = time.Time{}
		if th.riseSince.IsZero() {
			th.riseSince = now
		}
		if now.Sub(th.riseSince) >= th.grace {
			th.set(raw)
		}
	case th.rawLevel(value, th.hysteresis) < th.level:
		th.riseSince = time.Time{}
		if th.fallSince.IsZero() {
			th.fallSince = now
		}
		if now.Sub(th.fallSince) >= th.grace {
			th.set(th.lower())
		}
	default:
		th.riseSince, th.fallSince = time.Time{}, time.Time{}
	}
	return th.level
}

func (th *threshold) set(level Pressure) {
	th.level = level
	th.riseSince, th.fallSince = time.Time{}, time.Time{}
}

// lower returns the next enabled level below the current one.
func (th *threshold) lower() Pressure {
	if th.level == PressureHard && th.soft > 0 {
		return PressureSoft
	}
	return PressureNone
}

// rawLevel returns the level of value against thresholds lowered by the
// fraction margin.
func (th *threshold) rawLevel(value, margin float64) Pressure {
	switch {
	case th.hard > 0 && value >= th.hard*(1-margin):
		return PressureHard
	case th.soft > 0 && value >= th.soft*(1-margin):
		return PressureSoft
	}
	return PressureNone
}

// shedLadder decides which priorities soft pressure sheds. While pressure
// lasts it widens by one priority level per step, from the lowest. When
// pressure ends it narrows by one level per step, in the reverse order. The
// highest configured priority is never shed.
type shedLadder struct {
	// priorities holds the distinct priorities below the highest, ascending.
	priorities []int
	highest    int
	// rungs is how many of priorities are shed now.
	rungs int
}

func newShedLadder(all []int) *shedLadder {
	l := &shedLadder{}
	if len(all) == 0 {
		return l
	}
	highest := slices.Max(all)
	l.highest = highest
	for _, p := range all {
		if p != highest && !slices.Contains(l.priorities, p) {
			l.priorities = append(l.priorities, p)
		}
	}
	slices.Sort(l.priorities)
	return l
}

// step widens the ladder under pressure and narrows it otherwise, and
// returns the highest shed priority and whether any priority is shed.
func (l *shedLadder) step(pressure bool) (maxShed int, shedding bool) {
	if pressure && l.rungs < len(l.priorities) {
		l.rungs++
	}
	if !pressure && l.rungs > 0 {
		l.rungs--
	}
	if l.rungs == 0 {
		return 0, false
	}
	return l.priorities[l.rungs-1], true
}
