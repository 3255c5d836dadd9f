package asynqlimit

import (
	"log"
	"os"
	"testing"

	"go.uber.org/goleak"

	"github.com/asynqlimit/asynqlimit/internal/redistest"
)

// testRedis is the redis-server that the integration tests of this package
// share; each test takes a database of its own with NewDB.
var testRedis *redistest.Server

func TestMain(m *testing.M) {
	os.Exit(redistest.Main(leakCheck{m}, &testRedis))
}

// leakCheck runs the tests and then fails the run if goroutines are left
// behind.
type leakCheck struct{ m *testing.M }

func (c leakCheck) Run() int {
	before := goleak.IgnoreCurrent()
	code := c.m.Run()
	if code != 0 {
		return code
	}
	if err := goleak.Find(before); err != nil {
		log.Printf("goleak: %v", err)
		return 1
	}
	return 0
}
