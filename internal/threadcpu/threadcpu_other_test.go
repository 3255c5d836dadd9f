//go:build !linux

package threadcpu

import (
	"errors"
	"testing"
)

func TestUnsupportedPlatform(t *testing.T) {
	if Supported() {
		t.Error("Supported() = true, want false outside Linux")
	}
	thread, err := Lock()
	if !errors.Is(err, errors.ErrUnsupported) {
		t.Errorf("Lock() error = %v, want errors.ErrUnsupported", err)
	}
	if _, err := thread.Used(); !errors.Is(err, errors.ErrUnsupported) {
		t.Errorf("Used() error = %v, want errors.ErrUnsupported", err)
	}
	if _, err := thread.Unlock(); !errors.Is(err, errors.ErrUnsupported) {
		t.Errorf("Unlock() error = %v, want errors.ErrUnsupported", err)
	}
}
