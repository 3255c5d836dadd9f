package asynqlimit

import (
	"math"
	"testing"
	"time"
)

func TestDeferDelayBacksOff(t *testing.T) {
	l, err := New(Limits{Default: Budget{Concurrency: 1, DeferDelay: time.Second, MaxDeferDelay: 8 * time.Second}})
	if err != nil {
		t.Fatal(err)
	}
	q := l.queue("q")
	start := time.Unix(1000, 0)

	tests := []struct {
		after    time.Duration
		min, max time.Duration
	}{
		{0, 500 * time.Millisecond, time.Second},
		{999 * time.Millisecond, 500 * time.Millisecond, time.Second},
		{time.Second, time.Second, 2 * time.Second},
		{2 * time.Second, 2 * time.Second, 4 * time.Second},
		{3 * time.Second, 4 * time.Second, 8 * time.Second},
		{time.Hour, 4 * time.Second, 8 * time.Second},
	}
	for _, tt := range tests {
		for range 50 { // the jitter is random: check the range many times
			got := q.deferDelay(start.Add(tt.after))
			if got < tt.min || got > tt.max {
				t.Fatalf("deferDelay(%s after full) = %s, want in [%s, %s]", tt.after, got, tt.min, tt.max)
			}
		}
	}
}

func TestDeferDelayResetsWhenRoom(t *testing.T) {
	l, err := New(Limits{Default: Budget{Concurrency: 1, DeferDelay: time.Second, MaxDeferDelay: time.Minute}})
	if err != nil {
		t.Fatal(err)
	}
	q := l.queue("q")
	start := time.Unix(1000, 0)
	q.deferDelay(start)
	if got := q.deferDelay(start.Add(10 * time.Second)); got < 30*time.Second {
		t.Fatalf("deferDelay after 10s full = %s, want >= 30s", got)
	}

	if !q.tryAcquire() {
		t.Fatal("tryAcquire() = false on an empty queue")
	}
	q.release(grant{slot: true})
	if got := q.deferDelay(start.Add(20 * time.Second)); got > time.Second {
		t.Errorf("deferDelay after the queue had room = %s, want <= 1s", got)
	}
}

func TestDeferDelayHugeLimit(t *testing.T) {
	l, err := New(Limits{Default: Budget{Concurrency: 1, DeferDelay: time.Millisecond, MaxDeferDelay: math.MaxInt64}})
	if err != nil {
		t.Fatal(err)
	}
	q := l.queue("q")
	start := time.Unix(1000, 0)
	q.deferDelay(start)
	for after := time.Duration(0); after < time.Hour; after += 7 * time.Millisecond {
		got := q.deferDelay(start.Add(after))
		if got < time.Millisecond/2 {
			t.Fatalf("deferDelay(%s after full) = %s, want >= 0.5ms: doubling overflowed", after, got)
		}
	}
}

func TestBudgetDelayDefaults(t *testing.T) {
	tests := []struct {
		budget          Budget
		delay, maxDelay time.Duration
	}{
		{Budget{}, DefaultDeferDelay, DefaultMaxDeferDelay},
		{Budget{DeferDelay: 2 * time.Minute}, 2 * time.Minute, 2 * time.Minute},
		{Budget{DeferDelay: 100 * time.Millisecond, MaxDeferDelay: 5 * time.Second}, 100 * time.Millisecond, 5 * time.Second},
	}
	for _, tt := range tests {
		if got := tt.budget.deferDelay(); got != tt.delay {
			t.Errorf("%+v.deferDelay() = %s, want %s", tt.budget, got, tt.delay)
		}
		if got := tt.budget.maxDeferDelay(); got != tt.maxDelay {
			t.Errorf("%+v.maxDeferDelay() = %s, want %s", tt.budget, got, tt.maxDelay)
		}
	}
}
