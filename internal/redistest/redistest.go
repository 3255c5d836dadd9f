// Package redistest starts a Redis server on a free loopback port for
// integration tests.
//
// Start runs the redis-server binary found on PATH as a child process. When
// that binary is missing it falls back to miniredis, an in-process Go
// implementation, except when the CI environment variable is "true": CI must
// test against real Redis, so Start returns an error there instead.
//
// One server is meant to be shared by all tests of a package (see Main). Each
// test takes its own database with NewDB, so tests stay isolated while
// sharing the server.
package redistest

import (
	"context"
	"errors"
	"fmt"
	"log"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"runtime"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"time"

	"github.com/alicebob/miniredis/v2"
	"github.com/redis/go-redis/v9"
)

const (
	// databaseCount is the value passed to redis-server --databases. Database
	// 0 is left to clients that do not select one, so NewDB hands out
	// 1..databaseCount-1.
	databaseCount = 64

	// startTimeout bounds the wait for a new redis-server to respond to PING.
	// Redis starts in milliseconds because it loads no data, so reaching this
	// limit means the server is broken, not slow.
	startTimeout = 5 * time.Second

	// stopTimeout bounds each wait for redis-server to exit, first after
	// SIGTERM and then after SIGKILL.
	stopTimeout = 5 * time.Second

	// maxPortAttempts is how many free ports Start tries. Another process can
	// bind the port between the moment Start picks it and the moment
	// redis-server binds it, and then Start retries on a new port.
	maxPortAttempts = 3

	// pollInterval is the pause between two readiness checks.
	pollInterval = 20 * time.Millisecond

	// logTailLines is how many lines of the redis-server log an error
	// includes.
	logTailLines = 20
)

// errPortInUse marks a startup that failed because another process had
// taken the port, so that startRedis retries on another port.
var errPortInUse = errors.New("port already in use")

// Server is a running Redis server for tests: a redis-server child process,
// or a miniredis instance when Real is false.
type Server struct {
	// Addr is the host:port of the server, always on 127.0.0.1.
	Addr string

	// Real is true for a redis-server process and false for the miniredis
	// fallback, whose behaviour differs from real Redis in places (for
	// example, it runs Lua scripts with gopher-lua).
	Real bool

	logf func(format string, args ...any)

	// Fields of a redis-server process. waitErr is written once before
	// exited is closed, so it may be read only after <-exited.
	cmd     *exec.Cmd
	dir     string
	logPath string
	exited  chan struct{}
	waitErr error

	mini *miniredis.Miniredis

	// allocatedDBs counts NewDB calls.
	allocatedDBs atomic.Uint64

	closeOnce sync.Once
	closeErr  error
}

// Start starts a Redis server on a free port on 127.0.0.1 and returns it once
// it responds to PING.
//
// It runs redis-server from PATH with persistence disabled and a temporary
// working directory. If redis-server is missing and the CI environment
// variable is "true", Start returns an error that gives the install command.
// Otherwise it starts miniredis and logs a note that the tests run on it.
// logf receives these notes and may be nil, for example log.Printf or
// testing.T.Logf. The caller must call Close.
func Start(logf func(format string, args ...any)) (*Server, error) {
	if logf == nil {
		logf = func(string, ...any) {}
	}

	path, err := exec.LookPath("redis-server")
	if err == nil {
		return startRedis(path, logf, pickFreePort)
	}

	if os.Getenv("CI") == "true" {
		return nil, fmt.Errorf("redistest: redis-server is missing (%v), but CI=true requires tests to run against real Redis, "+
			"so install it with `apt-get install -y redis-server`", err)
	}
	return startMiniredis(logf)
}

// startMiniredis starts the in-process fallback server.
func startMiniredis(logf func(format string, args ...any)) (*Server, error) {
	mini, err := miniredis.Run()
	if err != nil {
		return nil, fmt.Errorf("redistest: start miniredis: %w", err)
	}

	logf("redistest: redis-server not found on PATH, so tests run on miniredis at %s, "+
		"which differs from real Redis in places. Install redis-server (`apt-get install -y redis-server`) to test against it.",
		mini.Addr())
	return &Server{Addr: mini.Addr(), Real: false, logf: logf, mini: mini}, nil
}

// startRedis starts redis-server from path on a port from pickPort, and tries
// a new port if another process takes the port first. Tests pass their own
// pickPort to force that conflict.
func startRedis(path string, logf func(format string, args ...any), pickPort func() (int, error)) (*Server, error) {
	dir, err := os.MkdirTemp("", "redistest-")
	if err != nil {
		return nil, fmt.Errorf("redistest: create working directory for redis-server: %w", err)
	}

	var lastErr error
	for attempt := 1; attempt <= maxPortAttempts; attempt++ {
		port, err := pickPort()
		if err != nil {
			os.RemoveAll(dir)
			return nil, err
		}

		s, err := launchRedis(path, dir, port, logf)
		if err == nil {
			return s, nil
		}
		if !errors.Is(err, errPortInUse) {
			os.RemoveAll(dir)
			return nil, err
		}

		logf("redistest: attempt %d of %d: %v; retrying on another port", attempt, maxPortAttempts, err)
		lastErr = err
	}

	os.RemoveAll(dir)
	return nil, fmt.Errorf("redistest: redis-server found no free port in %d attempts: %w", maxPortAttempts, lastErr)
}

// pickFreePort returns a TCP port on 127.0.0.1 that was free a moment ago.
// The port is released before it is returned, so another process may take
// it before redis-server binds it.
func pickFreePort() (int, error) {
	listener, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		return 0, fmt.Errorf("redistest: find a free port on 127.0.0.1: %w", err)
	}

	port := listener.Addr().(*net.TCPAddr).Port
	if err := listener.Close(); err != nil {
		return 0, fmt.Errorf("redistest: release free port %d: %w", port, err)
	}
	return port, nil
}

// launchRedis starts one redis-server process on port and waits until it
// responds to PING. The error wraps errPortInUse when another process holds
// the port.
func launchRedis(path, dir string, port int, logf func(format string, args ...any)) (*Server, error) {
	logPath := filepath.Join(dir, "redis.log")
	logFile, err := os.Create(logPath)
	if err != nil {
		return nil, fmt.Errorf("redistest: create redis-server log file: %w", err)
	}

	cmd := exec.Command(path,
		"--bind", "127.0.0.1",
		"--port", strconv.Itoa(port),
		"--save", "",
		"--appendonly", "no",
		"--databases", strconv.Itoa(databaseCount),
		"--protected-mode", "yes",
		"--dir", dir,
		"--daemonize", "no",
		// An empty logfile sends the log to stdout, which goes to logFile.
		"--logfile", "",
	)
	cmd.Dir = dir
	cmd.Stdout = logFile
	cmd.Stderr = logFile
	setParentDeathSignal(cmd)

	s := &Server{
		Addr:    net.JoinHostPort("127.0.0.1", strconv.Itoa(port)),
		Real:    true,
		logf:    logf,
		cmd:     cmd,
		dir:     dir,
		logPath: logPath,
		exited:  make(chan struct{}),
	}

	// Linux sends the parent death signal when the thread that started the
	// child exits, not the process. The Go runtime ends a thread when a
	// goroutine locked to it exits, so the goroutine that starts the child
	// keeps its thread locked until the child has exited.
	started := make(chan error)
	go func() {
		runtime.LockOSThread()
		defer runtime.UnlockOSThread()

		if err := cmd.Start(); err != nil {
			started <- err
			return
		}
		started <- nil
		s.waitErr = cmd.Wait()
		close(s.exited)
	}()

	err = <-started
	// The child holds its own descriptor for the log file, so this copy can
	// be closed whether or not the start succeeded.
	logFile.Close()
	if err != nil {
		return nil, fmt.Errorf("redistest: start %s: %w", path, err)
	}

	version, err := s.waitReady()
	if err != nil {
		if stopErr := s.stop(); stopErr != nil {
			logf("%v", stopErr)
		}
		return nil, err
	}

	logf("redistest: started redis-server %s (pid %d) on %s", version, cmd.Process.Pid, s.Addr)
	return s, nil
}

// waitReady polls the new redis-server until it responds to PING, and
// returns its version. It fails if the process exits or startTimeout passes
// first. It also fails with errPortInUse if the server listening on Addr is
// another process, which can happen before the new one finds the port taken
// and exits.
func (s *Server) waitReady() (string, error) {
	deadline := time.Now().Add(startTimeout)
	pid := s.cmd.Process.Pid

	for {
		select {
		case <-s.exited:
			tail := s.logTail()
			if strings.Contains(tail, "Address already in use") {
				return "", fmt.Errorf("redis-server (pid %d) could not bind %s: %w", pid, s.Addr, errPortInUse)
			}
			return "", fmt.Errorf("redistest: redis-server (pid %d) exited during startup on %s (%v); its log ends with:\n%s",
				pid, s.Addr, s.waitErr, tail)
		default:
		}

		if time.Now().After(deadline) {
			return "", fmt.Errorf("redistest: redis-server (pid %d) on %s did not respond to PING within %s; its log ends with:\n%s",
				pid, s.Addr, startTimeout, s.logTail())
		}

		info, err := s.serverInfo()
		if err == nil {
			if info["process_id"] != strconv.Itoa(pid) {
				return "", fmt.Errorf("another Redis server (pid %s) is listening on %s instead of pid %d: %w",
					info["process_id"], s.Addr, pid, errPortInUse)
			}
			return info["redis_version"], nil
		}

		time.Sleep(pollInterval)
	}
}

// serverInfo sends PING and INFO server to Addr and returns the fields of the
// INFO reply.
func (s *Server) serverInfo() (map[string]string, error) {
	// A plain TCP dial comes first because go-redis logs each failed dial and
	// starts a background redial loop after repeated failures. Dials fail
	// until the server listens.
	conn, err := net.DialTimeout("tcp", s.Addr, 200*time.Millisecond)
	if err != nil {
		return nil, err
	}
	conn.Close()

	client := newClient(s.Addr, 0)
	defer client.Close()

	// The port may belong to another process that accepts connections but
	// never replies, so the probe must not wait long for a reply.
	ctx, cancel := context.WithTimeout(context.Background(), 250*time.Millisecond)
	defer cancel()

	if err := client.Ping(ctx).Err(); err != nil {
		return nil, err
	}
	info, err := client.Info(ctx, "server").Result()
	if err != nil {
		return nil, err
	}
	return parseInfo(info), nil
}

// parseInfo splits an INFO reply into its "key:value" fields and skips
// section headers and blank lines.
func parseInfo(info string) map[string]string {
	fields := make(map[string]string)
	for _, line := range strings.Split(info, "\n") {
		line = strings.TrimSpace(line)
		if line == "" || strings.HasPrefix(line, "#") {
			continue
		}
		key, value, found := strings.Cut(line, ":")
		if found {
			fields[key] = value
		}
	}
	return fields
}

// logTail returns the last logTailLines lines of the redis-server log, or a
// note on why the log could not be read.
func (s *Server) logTail() string {
	data, err := os.ReadFile(s.logPath)
	if err != nil {
		return fmt.Sprintf("(redis-server log %s could not be read: %v)", s.logPath, err)
	}

	lines := strings.Split(strings.TrimRight(string(data), "\n"), "\n")
	if len(lines) > logTailLines {
		lines = lines[len(lines)-logTailLines:]
	}
	return strings.Join(lines, "\n")
}

// newClient returns a go-redis client for database db on addr. Its commands
// time out at the deadline of their context, and it dials and sends each
// command once, so that a dead or silent server fails fast. It skips CLIENT
// SETINFO, which Redis before 7.2 rejects.
func newClient(addr string, db int) *redis.Client {
	return redis.NewClient(&redis.Options{
		Addr:                  addr,
		DB:                    db,
		DialTimeout:           time.Second,
		DialerRetries:         1,
		MaxRetries:            -1,
		ContextTimeoutEnabled: true,
		DisableIdentity:       true,
	})
}

// NewDB returns a database number for one test, from 1 to 63. Database 0 is
// never returned, so code that does not select a database does not touch
// the data of a test.
//
// Each call returns the next number, and the 64th call starts again at 1.
// A number that comes around again is flushed with FLUSHDB before it is
// returned, so it is empty, but a test that still holds it loses its data.
// Tests that run at the same time must therefore hold at most 63 databases
// between them. NewDB panics if that flush fails, for example because the
// server is down. NewDB is safe for concurrent use.
func (s *Server) NewDB() int {
	call := s.allocatedDBs.Add(1)
	usable := uint64(databaseCount - 1)
	db := int((call-1)%usable) + 1

	if call > usable {
		if err := s.FlushDB(db); err != nil {
			panic(fmt.Sprintf("redistest: NewDB could not reuse database %d: %v", db, err))
		}
	}
	return db
}

// FlushDB deletes every key in database db, which must be from 0 to 63.
func (s *Server) FlushDB(db int) error {
	if db < 0 || db >= databaseCount {
		return fmt.Errorf("redistest: invalid database %d: must be from 0 to %d", db, databaseCount-1)
	}

	client := newClient(s.Addr, db)
	defer client.Close()

	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()

	if err := client.FlushDB(ctx).Err(); err != nil {
		return fmt.Errorf("redistest: FLUSHDB on database %d of %s failed: %w", db, s.Addr, err)
	}
	return nil
}

// Close stops the server and removes its working directory. It sends
// SIGTERM to redis-server and, if the process is still running after 5
// seconds, SIGKILL.
//
// Close returns an error if redis-server had already exited, because the
// tests then ran against a dead server, and the error includes the end of
// its log. Later calls return the result of the first.
func (s *Server) Close() error {
	s.closeOnce.Do(func() {
		s.closeErr = s.close()
	})
	return s.closeErr
}

func (s *Server) close() error {
	if s.mini != nil {
		s.mini.Close()
		return nil
	}

	var errs []error
	select {
	case <-s.exited:
		errs = append(errs, fmt.Errorf("redistest: redis-server (pid %d) on %s exited before Close (%v); its log ends with:\n%s",
			s.cmd.Process.Pid, s.Addr, s.waitErr, s.logTail()))
	default:
		if err := s.stop(); err != nil {
			errs = append(errs, err)
		}
	}

	if err := os.RemoveAll(s.dir); err != nil {
		errs = append(errs, fmt.Errorf("redistest: remove redis-server working directory: %w", err))
	}
	return errors.Join(errs...)
}

// stop ends the redis-server process: SIGTERM first, then SIGKILL after
// stopTimeout. It returns once the process has exited.
func (s *Server) stop() error {
	pid := s.cmd.Process.Pid

	select {
	case <-s.exited:
		return nil
	default:
	}

	// Signal fails where SIGTERM is not supported (Windows) or when the
	// process has just exited, and in both cases SIGKILL below handles it.
	if err := s.cmd.Process.Signal(syscall.SIGTERM); err == nil {
		select {
		case <-s.exited:
			return nil
		case <-time.After(stopTimeout):
			s.logf("redistest: redis-server (pid %d) still running %s after SIGTERM, sending SIGKILL", pid, stopTimeout)
		}
	}

	if err := s.cmd.Process.Kill(); err != nil && !errors.Is(err, os.ErrProcessDone) {
		return fmt.Errorf("redistest: kill redis-server (pid %d): %w", pid, err)
	}
	select {
	case <-s.exited:
		return nil
	case <-time.After(stopTimeout):
		return fmt.Errorf("redistest: redis-server (pid %d) still running %s after SIGKILL", pid, stopTimeout)
	}
}

// TestRunner runs a package's tests and returns the exit code. *testing.M
// implements it.
type TestRunner interface {
	Run() int
}

// Main starts a server, stores it in *srv, runs the tests and closes the
// server. It returns the exit code for os.Exit, which is non-zero if the
// server did not start, a test failed, or Close failed. Notes and errors go
// to the standard logger. A package uses it like this:
//
//	var srv *redistest.Server
//
//	func TestMain(m *testing.M) {
//		os.Exit(redistest.Main(m, &srv))
//	}
func Main(m TestRunner, srv **Server) int {
	server, err := Start(log.Printf)
	if err != nil {
		log.Print(err)
		return 1
	}

	*srv = server
	code := m.Run()

	if err := server.Close(); err != nil {
		log.Print(err)
		if code == 0 {
			code = 1
		}
	}
	return code
}
