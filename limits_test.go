package asynqlimit

import (
	"errors"
	"strings"
	"testing"
	"time"

	"github.com/google/go-cmp/cmp"
)

func TestValidate(t *testing.T) {
	tests := []struct {
		name   string
		limits Limits
		want   []string // paths of the invalid fields, in order
	}{
		{name: "zero value", limits: Limits{}},
		{
			name: "valid",
			limits: Limits{
				Queues: map[string]Budget{
					"critical": {Concurrency: 8, Timeout: 500 * time.Millisecond, Priority: 2},
					"low":      {Concurrency: 1, MaxPayload: 1024, DeferDelay: time.Second, MaxDeferDelay: time.Minute},
				},
				Default: Budget{Concurrency: 2},
				Mode:    Observe,
			},
		},
		{
			name:   "negative concurrency",
			limits: Limits{Queues: map[string]Budget{"low": {Concurrency: -1}}},
			want:   []string{`Queues["low"].Concurrency`},
		},
		{
			name: "every field of one budget",
			limits: Limits{Default: Budget{
				Concurrency: -1, Timeout: -time.Second, MaxPayload: -2,
				DeferDelay: -time.Second, MaxDeferDelay: -time.Second,
			}},
			want: []string{
				"Default.Concurrency", "Default.Timeout", "Default.MaxPayload",
				"Default.DeferDelay", "Default.MaxDeferDelay",
			},
		},
		{
			name:   "max defer delay below defer delay",
			limits: Limits{Default: Budget{DeferDelay: 10 * time.Second, MaxDeferDelay: time.Second}},
			want:   []string{"Default.MaxDeferDelay"},
		},
		{
			name:   "max defer delay below default defer delay",
			limits: Limits{Default: Budget{MaxDeferDelay: time.Millisecond}},
			want:   []string{"Default.MaxDeferDelay"},
		},
		{
			name:   "empty queue name",
			limits: Limits{Queues: map[string]Budget{"": {}}},
			want:   []string{`Queues[""]`},
		},
		{
			name:   "queue name of spaces",
			limits: Limits{Queues: map[string]Budget{"  ": {}}},
			want:   []string{`Queues["  "]`},
		},
		{
			name:   "queue name not UTF-8",
			limits: Limits{Queues: map[string]Budget{"\xff\xfe": {}}},
			want:   []string{`Queues["\xff\xfe"]`},
		},
		{
			name:   "queue named other",
			limits: Limits{Queues: map[string]Budget{"other": {}}},
			want:   []string{`Queues["other"]`},
		},
		{
			name:   "unknown mode",
			limits: Limits{Mode: Mode(7)},
			want:   []string{"Mode"},
		},
		{
			name: "fields of several queues sorted by name",
			limits: Limits{
				Queues: map[string]Budget{
					"b": {Timeout: -1},
					"a": {Concurrency: -3},
				},
				Default: Budget{MaxPayload: -1},
			},
			want: []string{`Queues["a"].Concurrency`, `Queues["b"].Timeout`, "Default.MaxPayload"},
		},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			err := tt.limits.Validate()
			if len(tt.want) == 0 {
				if err != nil {
					t.Fatalf("Validate() = %v, want nil", err)
				}
				return
			}
			var cerr *ConfigError
			if !errors.As(err, &cerr) {
				t.Fatalf("Validate() = %v, want a *ConfigError", err)
			}
			var got []string
			for _, f := range cerr.Fields {
				got = append(got, f.Path)
			}
			if diff := cmp.Diff(tt.want, got); diff != "" {
				t.Errorf("invalid field paths (-want +got):\n%s", diff)
			}
		})
	}
}

func TestValidateMessage(t *testing.T) {
	err := Limits{Queues: map[string]Budget{"low": {Concurrency: -1, MaxPayload: -5}}}.Validate()
	if err == nil {
		t.Fatal("Validate() = nil, want an error")
	}
	for _, want := range []string{
		"asynqlimit: invalid limits: ",
		`Queues["low"].Concurrency: must be >= 0, got -1`,
		`Queues["low"].MaxPayload: must be >= 0 bytes, got -5`,
		"; ",
	} {
		if !strings.Contains(err.Error(), want) {
			t.Errorf("error %q does not contain %q", err, want)
		}
	}
}

func TestNewRejectsInvalidLimits(t *testing.T) {
	l, err := New(Limits{Default: Budget{Concurrency: -1}})
	if l != nil {
		t.Errorf("New() returned a Limiter for invalid limits")
	}
	var cerr *ConfigError
	if !errors.As(err, &cerr) {
		t.Fatalf("New() error = %v, want a *ConfigError", err)
	}
}

func TestNewCopiesQueues(t *testing.T) {
	queues := map[string]Budget{"named": {Concurrency: 1}}
	l, err := New(Limits{Queues: queues})
	if err != nil {
		t.Fatal(err)
	}
	queues["added-later"] = Budget{Concurrency: 5}

	if got := l.queue("added-later"); got.label != otherLabel {
		t.Errorf("queue added to the map after New has label %q, want %q", got.label, otherLabel)
	}
	if got := l.limits.label("added-later"); got != otherLabel {
		t.Errorf("limits.label(added-later) = %q, want %q", got, otherLabel)
	}
}

func TestModeString(t *testing.T) {
	for mode, want := range map[Mode]string{Enforce: "enforce", Observe: "observe", Mode(9): "Mode(9)"} {
		if got := mode.String(); got != want {
			t.Errorf("Mode(%d).String() = %q, want %q", int(mode), got, want)
		}
	}
}

func TestQueueLabel(t *testing.T) {
	l, err := New(Limits{Queues: map[string]Budget{"critical": {Concurrency: 2}}, Default: Budget{Concurrency: 3}})
	if err != nil {
		t.Fatal(err)
	}
	defer l.Close()

	if got := l.queue("critical"); got.label != "critical" || got.budget.Concurrency != 2 {
		t.Errorf("queue(critical) = label %q concurrency %d, want critical 2", got.label, got.budget.Concurrency)
	}
	attacker := l.queue("x-attacker-chosen")
	if attacker.label != otherLabel || attacker.budget.Concurrency != 3 {
		t.Errorf("queue(unnamed) = label %q concurrency %d, want other 3", attacker.label, attacker.budget.Concurrency)
	}
	if again := l.queue("x-attacker-chosen"); again != attacker {
		t.Errorf("queue(unnamed) returned a new state on the second call, want the same one")
	}
}
