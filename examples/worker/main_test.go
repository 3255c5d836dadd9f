package main

import (
	"bytes"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"

	"github.com/asynqlimit/asynqlimit/internal/redistest"
)

var testRedis *redistest.Server

func TestMain(m *testing.M) {
	os.Exit(redistest.Main(m, &testRedis))
}

// TestWorkerRunsWorkload runs the example as a user does, against the test
// redis-server, and checks that every task it enqueued finished.
func TestWorkerRunsWorkload(t *testing.T) {
	bin := filepath.Join(t.TempDir(), "worker")
	if out, err := exec.Command("go", "build", "-o", bin, ".").CombinedOutput(); err != nil {
		t.Fatalf("go build: %v\n%s", err, out)
	}
	cmd := exec.Command(bin, "-duration", "12s", "-metrics-addr", "127.0.0.1:0")
	cmd.Env = append(os.Environ(), "REDIS_ADDR="+testRedis.Addr)
	var stdout, stderr bytes.Buffer
	cmd.Stdout, cmd.Stderr = &stdout, &stderr
	if err := cmd.Run(); err != nil {
		t.Fatalf("worker: %v\nstdout:\n%s\nstderr:\n%s", err, stdout.String(), stderr.String())
	}

	out := stdout.String()
	for _, want := range []string{
		"queue=critical", "queue=default", "queue=low",
		"all 30 tasks finished: 29 completed, 1 archived",
		"payload too large",
	} {
		if !strings.Contains(out, want) {
			t.Errorf("stdout lacks %q:\n%s\nstderr:\n%s", want, out, stderr.String())
		}
	}
}
