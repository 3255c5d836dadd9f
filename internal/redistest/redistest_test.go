package redistest

import (
	"context"
	"errors"
	"fmt"
	"net"
	"os"
	"os/exec"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/redis/go-redis/v9"
)

// logRecorder collects the notes that Start logs, for tests that check them.
type logRecorder struct {
	mu    sync.Mutex
	lines []string
}

func (r *logRecorder) logf(format string, args ...any) {
	r.mu.Lock()
	defer r.mu.Unlock()
	r.lines = append(r.lines, fmt.Sprintf(format, args...))
}

func (r *logRecorder) String() string {
	r.mu.Lock()
	defer r.mu.Unlock()
	return strings.Join(r.lines, "\n")
}

// requireRedisServer returns the path of redis-server. It skips the test
// when the binary is missing, except under CI=true, where it fails.
func requireRedisServer(t *testing.T) string {
	t.Helper()
	path, err := exec.LookPath("redis-server")
	if err == nil {
		return path
	}
	if os.Getenv("CI") == "true" {
		t.Fatalf("redis-server is missing under CI=true: %v", err)
	}
	t.Skipf("redis-server is not on PATH: %v", err)
	return ""
}

// startServer starts a server for one test and closes it when the test ends.
func startServer(t *testing.T) *Server {
	t.Helper()
	srv, err := Start(t.Logf)
	if err != nil {
		t.Fatalf("Start: %v", err)
	}
	t.Cleanup(func() {
		if err := srv.Close(); err != nil {
			t.Errorf("Close: %v", err)
		}
	})
	return srv
}

// clientFor returns a client for database db that the test closes at its end.
func clientFor(t *testing.T, srv *Server, db int) *redis.Client {
	t.Helper()
	client := newClient(srv.Addr, db)
	t.Cleanup(func() { client.Close() })
	return client
}

// requirePortClosed fails the test unless nothing accepts connections on addr.
func requirePortClosed(t *testing.T, addr string) {
	t.Helper()
	conn, err := net.DialTimeout("tcp", addr, time.Second)
	if err == nil {
		conn.Close()
		t.Fatalf("%s still accepts connections after Close", addr)
	}
}

// occupyPort listens on a free loopback port until the test ends and returns
// the port.
func occupyPort(t *testing.T) int {
	t.Helper()
	listener, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatalf("listen on 127.0.0.1:0: %v", err)
	}
	t.Cleanup(func() { listener.Close() })
	return listener.Addr().(*net.TCPAddr).Port
}

func TestStartRespondsToPing(t *testing.T) {
	srv := startServer(t)
	ctx := context.Background()

	host, _, err := net.SplitHostPort(srv.Addr)
	if err != nil {
		t.Fatalf("split Addr %q: %v", srv.Addr, err)
	}
	if host != "127.0.0.1" {
		t.Errorf("Addr host = %q, want 127.0.0.1", host)
	}

	client := clientFor(t, srv, 0)
	if err := client.Ping(ctx).Err(); err != nil {
		t.Fatalf("PING %s: %v", srv.Addr, err)
	}
}

func TestStartConfiguresRealServer(t *testing.T) {
	requireRedisServer(t)
	srv := startServer(t)
	if !srv.Real {
		t.Fatalf("Real = false although redis-server is on PATH")
	}

	client := clientFor(t, srv, 0)
	ctx := context.Background()

	info, err := client.Info(ctx, "server").Result()
	if err != nil {
		t.Fatalf("INFO server: %v", err)
	}
	if got, want := parseInfo(info)["process_id"], strconv.Itoa(srv.cmd.Process.Pid); got != want {
		t.Errorf("process_id = %q, want child pid %s", got, want)
	}

	wantConfig := map[string]string{
		"bind":       "127.0.0.1",
		"databases":  "64",
		"save":       "",
		"appendonly": "no",
	}
	for name, want := range wantConfig {
		config, err := client.ConfigGet(ctx, name).Result()
		if err != nil {
			t.Errorf("CONFIG GET %s: %v", name, err)
			continue
		}
		if got := config[name]; got != want {
			t.Errorf("CONFIG GET %s = %q, want %q", name, got, want)
		}
	}
}

func TestNewDBReturnsDistinctNumbers(t *testing.T) {
	srv := startServer(t)

	seen := make(map[int]bool)
	for i := 0; i < databaseCount-1; i++ {
		db := srv.NewDB()
		if db < 1 || db >= databaseCount {
			t.Fatalf("call %d: NewDB = %d, want 1..%d", i+1, db, databaseCount-1)
		}
		if seen[db] {
			t.Fatalf("call %d: NewDB returned %d twice", i+1, db)
		}
		seen[db] = true
	}
}

func TestNewDBConcurrentCalls(t *testing.T) {
	srv := startServer(t)

	results := make(chan int, databaseCount-1)
	var wg sync.WaitGroup
	for i := 0; i < databaseCount-1; i++ {
		wg.Add(1)
		go func() {
			defer wg.Done()
			results <- srv.NewDB()
		}()
	}
	wg.Wait()
	close(results)

	seen := make(map[int]bool)
	for db := range results {
		if seen[db] {
			t.Errorf("NewDB returned %d to two goroutines", db)
		}
		seen[db] = true
	}
}

func TestNewDBFlushesReusedDatabase(t *testing.T) {
	srv := startServer(t)
	ctx := context.Background()

	for i := 0; i < databaseCount-1; i++ {
		srv.NewDB()
	}

	first := clientFor(t, srv, 1)
	if err := first.Set(ctx, "stale", "x", 0).Err(); err != nil {
		t.Fatalf("SET in database 1: %v", err)
	}
	second := clientFor(t, srv, 2)
	if err := second.Set(ctx, "kept", "x", 0).Err(); err != nil {
		t.Fatalf("SET in database 2: %v", err)
	}

	if db := srv.NewDB(); db != 1 {
		t.Fatalf("NewDB after %d calls = %d, want 1", databaseCount-1, db)
	}

	staleCount, err := first.Exists(ctx, "stale").Result()
	if err != nil {
		t.Fatalf("EXISTS in database 1: %v", err)
	}
	if staleCount != 0 {
		t.Errorf("EXISTS stale in reused database 1 = %d, want 0", staleCount)
	}

	keptCount, err := second.Exists(ctx, "kept").Result()
	if err != nil {
		t.Fatalf("EXISTS in database 2: %v", err)
	}
	if keptCount != 1 {
		t.Errorf("EXISTS kept in database 2 = %d, want 1", keptCount)
	}
}

func TestDatabasesAreIsolated(t *testing.T) {
	srv := startServer(t)
	ctx := context.Background()

	a := clientFor(t, srv, srv.NewDB())
	b := clientFor(t, srv, srv.NewDB())

	if err := a.Set(ctx, "key", "a", 0).Err(); err != nil {
		t.Fatalf("SET in first database: %v", err)
	}
	count, err := b.Exists(ctx, "key").Result()
	if err != nil {
		t.Fatalf("EXISTS in second database: %v", err)
	}
	if count != 0 {
		t.Errorf("EXISTS key in second database = %d, want 0", count)
	}
}

func TestFlushDBDeletesKeys(t *testing.T) {
	srv := startServer(t)
	ctx := context.Background()

	db := srv.NewDB()
	client := clientFor(t, srv, db)
	if err := client.Set(ctx, "key", "x", 0).Err(); err != nil {
		t.Fatalf("SET: %v", err)
	}

	if err := srv.FlushDB(db); err != nil {
		t.Fatalf("FlushDB(%d): %v", db, err)
	}
	size, err := client.DBSize(ctx).Result()
	if err != nil {
		t.Fatalf("DBSIZE: %v", err)
	}
	if size != 0 {
		t.Errorf("DBSIZE after FlushDB = %d, want 0", size)
	}
}

func TestFlushDBRejectsInvalidNumber(t *testing.T) {
	srv := startServer(t)

	for _, db := range []int{-1, databaseCount} {
		err := srv.FlushDB(db)
		if err == nil {
			t.Errorf("FlushDB(%d) = nil, want an error", db)
			continue
		}
		if !strings.Contains(err.Error(), "invalid database "+strconv.Itoa(db)) {
			t.Errorf("FlushDB(%d) error = %q, want it to name the invalid database", db, err)
		}
	}
}

func TestCloseStopsRealServer(t *testing.T) {
	requireRedisServer(t)
	srv, err := Start(t.Logf)
	if err != nil {
		t.Fatalf("Start: %v", err)
	}

	if err := srv.Close(); err != nil {
		t.Fatalf("Close: %v", err)
	}

	requirePortClosed(t, srv.Addr)
	select {
	case <-srv.exited:
	default:
		t.Errorf("redis-server (pid %d) is still running after Close", srv.cmd.Process.Pid)
	}
	if _, err := os.Stat(srv.dir); !errors.Is(err, os.ErrNotExist) {
		t.Errorf("working directory %s still exists after Close (stat error: %v)", srv.dir, err)
	}
	if err := srv.Close(); err != nil {
		t.Errorf("second Close: %v", err)
	}
}

func TestCloseReportsCrashedServer(t *testing.T) {
	requireRedisServer(t)
	srv, err := Start(t.Logf)
	if err != nil {
		t.Fatalf("Start: %v", err)
	}

	if err := srv.cmd.Process.Kill(); err != nil {
		t.Fatalf("kill redis-server: %v", err)
	}
	<-srv.exited

	err = srv.Close()
	if err == nil {
		t.Fatal("Close after the server crashed = nil, want an error")
	}
	if !strings.Contains(err.Error(), "exited before Close") {
		t.Errorf("Close error = %q, want it to say the server exited before Close", err)
	}
	if _, err := os.Stat(srv.dir); !errors.Is(err, os.ErrNotExist) {
		t.Errorf("working directory %s still exists after Close (stat error: %v)", srv.dir, err)
	}
}

func TestStartFallsBackToMiniredis(t *testing.T) {
	t.Setenv("PATH", t.TempDir())
	t.Setenv("CI", "")

	var log logRecorder
	srv, err := Start(log.logf)
	if err != nil {
		t.Fatalf("Start without redis-server: %v", err)
	}
	defer srv.Close()

	if srv.Real {
		t.Errorf("Real = true, want false for miniredis")
	}
	if !strings.Contains(log.String(), "tests run on miniredis") {
		t.Errorf("log = %q, want a note that tests run on miniredis", log.String())
	}

	client := clientFor(t, srv, srv.NewDB())
	if err := client.Ping(context.Background()).Err(); err != nil {
		t.Errorf("PING miniredis at %s: %v", srv.Addr, err)
	}

	if err := srv.Close(); err != nil {
		t.Fatalf("Close: %v", err)
	}
	requirePortClosed(t, srv.Addr)
}

func TestStartFailsInCIWithoutRedis(t *testing.T) {
	t.Setenv("PATH", t.TempDir())
	t.Setenv("CI", "true")

	srv, err := Start(t.Logf)
	if err == nil {
		srv.Close()
		t.Fatal("Start under CI=true without redis-server = nil error, want an error")
	}
	if !strings.Contains(err.Error(), "redis-server is missing") {
		t.Errorf("error = %q, want it to say redis-server is missing", err)
	}
	if !strings.Contains(err.Error(), "apt-get install -y redis-server") {
		t.Errorf("error = %q, want the install command", err)
	}
}

func TestStartRetriesTakenPort(t *testing.T) {
	path := requireRedisServer(t)
	occupiedPort := occupyPort(t)

	calls := 0
	pickPort := func() (int, error) {
		calls++
		if calls == 1 {
			return occupiedPort, nil
		}
		return pickFreePort()
	}

	var log logRecorder
	srv, err := startRedis(path, log.logf, pickPort)
	if err != nil {
		t.Fatalf("startRedis: %v", err)
	}
	defer srv.Close()

	if calls != 2 {
		t.Errorf("pickPort called %d times, want 2", calls)
	}
	if srv.Addr == net.JoinHostPort("127.0.0.1", strconv.Itoa(occupiedPort)) {
		t.Errorf("Addr = %s, the port that was occupied", srv.Addr)
	}
	if !strings.Contains(log.String(), "retrying on another port") {
		t.Errorf("log = %q, want a retry note", log.String())
	}
}

func TestStartRetriesPortOfOtherRedis(t *testing.T) {
	path := requireRedisServer(t)
	other := startServer(t)
	_, otherPort, err := net.SplitHostPort(other.Addr)
	if err != nil {
		t.Fatalf("split Addr %q: %v", other.Addr, err)
	}

	calls := 0
	pickPort := func() (int, error) {
		calls++
		if calls == 1 {
			return strconv.Atoi(otherPort)
		}
		return pickFreePort()
	}

	srv, err := startRedis(path, t.Logf, pickPort)
	if err != nil {
		t.Fatalf("startRedis: %v", err)
	}
	defer srv.Close()

	if srv.Addr == other.Addr {
		t.Errorf("Addr = %s, the address of the other server", srv.Addr)
	}

	// The retry must stop only its own process, never the server that held
	// the port.
	client := clientFor(t, other, 0)
	if err := client.Ping(context.Background()).Err(); err != nil {
		t.Errorf("PING the other server after the retry: %v", err)
	}
}

func TestStartGivesUpWhenPortsStayTaken(t *testing.T) {
	path := requireRedisServer(t)
	t.Setenv("TMPDIR", t.TempDir())
	occupiedPort := occupyPort(t)

	calls := 0
	pickPort := func() (int, error) {
		calls++
		return occupiedPort, nil
	}

	srv, err := startRedis(path, t.Logf, pickPort)
	if err == nil {
		srv.Close()
		t.Fatal("startRedis on an occupied port = nil error, want an error")
	}
	if !errors.Is(err, errPortInUse) {
		t.Errorf("error = %v, want it to wrap errPortInUse", err)
	}
	if calls != maxPortAttempts {
		t.Errorf("pickPort called %d times, want %d", calls, maxPortAttempts)
	}

	entries, err := os.ReadDir(os.Getenv("TMPDIR"))
	if err != nil {
		t.Fatalf("read TMPDIR: %v", err)
	}
	if len(entries) != 0 {
		t.Errorf("TMPDIR contains %d entries after the failed start, want 0", len(entries))
	}
}

// fakeRunner replaces *testing.M in tests of Main.
type fakeRunner struct {
	run func() int
}

func (r fakeRunner) Run() int {
	return r.run()
}

func TestMainRunsTestsAndClosesServer(t *testing.T) {
	var srv *Server
	ran := false
	runner := fakeRunner{run: func() int {
		ran = true
		if srv == nil {
			t.Error("srv is nil while the tests run")
			return 0
		}
		client := newClient(srv.Addr, srv.NewDB())
		defer client.Close()
		if err := client.Ping(context.Background()).Err(); err != nil {
			t.Errorf("PING during the tests: %v", err)
		}
		return 3
	}}

	if code := Main(runner, &srv); code != 3 {
		t.Errorf("Main = %d, want the runner's exit code 3", code)
	}
	if !ran {
		t.Fatal("Main did not call Run")
	}
	requirePortClosed(t, srv.Addr)
}

func TestMainFailsWhenStartFails(t *testing.T) {
	t.Setenv("PATH", t.TempDir())
	t.Setenv("CI", "true")

	var srv *Server
	ran := false
	runner := fakeRunner{run: func() int {
		ran = true
		return 0
	}}

	if code := Main(runner, &srv); code == 0 {
		t.Errorf("Main = 0, want a non-zero exit code")
	}
	if ran {
		t.Error("Main ran the tests although the server did not start")
	}
	if srv != nil {
		t.Errorf("srv = %v, want nil", srv)
	}
}

func TestParseInfoSkipsHeaders(t *testing.T) {
	info := "# Server\r\nredis_version:7.0.15\r\nprocess_id:42\r\n\r\n"

	fields := parseInfo(info)
	if got := fields["redis_version"]; got != "7.0.15" {
		t.Errorf("redis_version = %q, want 7.0.15", got)
	}
	if got := fields["process_id"]; got != "42" {
		t.Errorf("process_id = %q, want 42", got)
	}
	if len(fields) != 2 {
		t.Errorf("parseInfo returned %d fields (%v), want 2", len(fields), fields)
	}
}
