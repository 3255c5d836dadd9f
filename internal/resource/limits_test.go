package resource

import (
	"os"
	"path/filepath"
	"strings"
	"testing"
)

const (
	mib = 1 << 20
	gib = 1 << 30
)

// testHost is a machine larger than any cgroup limit in these tests, so the
// host bounds apply only where a test means them to.
var testHost = hostLimits{memoryBytes: 64 * gib, gomaxprocs: 6, numCPU: 8}

// Mount lines for the usual layouts. A cgroup namespace or a container bind
// mount sets the mount root (field 4) to the container's cgroup.
const (
	mountV2 = "30 23 0:26 / /sys/fs/cgroup rw,nosuid,nodev,noexec,relatime shared:4 - cgroup2 cgroup2 rw,nsdelegate\n"

	mountV1Memory = "35 31 0:32 / /sys/fs/cgroup/memory rw,relatime - cgroup cgroup rw,memory\n"
	mountV1CPU    = "32 31 0:29 / /sys/fs/cgroup/cpu,cpuacct rw,relatime - cgroup cgroup rw,cpu,cpuacct\n"

	// mountHybridV2 is the v2 hierarchy of a hybrid system, which has no
	// controllers because v1 mounts own them.
	mountHybridV2 = "41 31 0:38 / /sys/fs/cgroup/unified rw,relatime - cgroup2 cgroup2 rw\n"
	mountProc     = "22 27 0:21 / /proc rw,relatime - proc proc rw\n"
)

// writeTree creates each file of files, a map from a slash-separated path
// under root to its contents.
func writeTree(t *testing.T, root string, files map[string]string) {
	t.Helper()
	for name, contents := range files {
		path := filepath.Join(root, filepath.FromSlash(name))
		if err := os.MkdirAll(filepath.Dir(path), 0o755); err != nil {
			t.Fatal(err)
		}
		if err := os.WriteFile(path, []byte(contents), 0o644); err != nil {
			t.Fatal(err)
		}
	}
}

// detectFromTree writes files to a new temporary directory and detects the
// limits under it with testHost.
func detectFromTree(t *testing.T, files map[string]string) (Limits, error) {
	t.Helper()
	root := t.TempDir()
	writeTree(t, root, files)
	return detectLimitsFrom(root, testHost)
}

func checkLimits(t *testing.T, got, want Limits) {
	t.Helper()
	if got.MemoryBytes != want.MemoryBytes {
		t.Errorf("MemoryBytes = %d, want %d", got.MemoryBytes, want.MemoryBytes)
	}
	if got.MemorySource != want.MemorySource {
		t.Errorf("MemorySource = %q, want %q", got.MemorySource, want.MemorySource)
	}
	if got.CPUCores != want.CPUCores {
		t.Errorf("CPUCores = %v, want %v", got.CPUCores, want.CPUCores)
	}
	if got.CPUSource != want.CPUSource {
		t.Errorf("CPUSource = %q, want %q", got.CPUSource, want.CPUSource)
	}
}

// hostOnly is the result when no cgroup sets a limit.
var hostOnly = Limits{
	MemoryBytes:  testHost.memoryBytes,
	MemorySource: "host memory",
	CPUCores:     float64(testHost.gomaxprocs),
	CPUSource:    "GOMAXPROCS",
}

func TestDetectLimitsCgroupV2(t *testing.T) {
	got, err := detectFromTree(t, map[string]string{
		"proc/self/cgroup":               "0::/app\n",
		"proc/self/mountinfo":            mountProc + mountV2,
		"sys/fs/cgroup/app/memory.max":   "536870912\n",
		"sys/fs/cgroup/app/cpu.max":      "150000 100000\n",
		"sys/fs/cgroup/app/memory.high":  "max\n",
		"sys/fs/cgroup/cgroup.procs":     "1\n",
		"sys/fs/cgroup/app/cgroup.procs": "42\n",
	})
	if err != nil {
		t.Fatal(err)
	}
	checkLimits(t, got, Limits{
		MemoryBytes:  512 * mib,
		MemorySource: "cgroup v2 memory.max",
		CPUCores:     1.5,
		CPUSource:    "cgroup v2 cpu.max",
	})
}

func TestDetectLimitsCgroupV2Max(t *testing.T) {
	got, err := detectFromTree(t, map[string]string{
		"proc/self/cgroup":             "0::/app\n",
		"proc/self/mountinfo":          mountV2,
		"sys/fs/cgroup/app/memory.max": "max\n",
		"sys/fs/cgroup/app/cpu.max":    "max 100000\n",
	})
	if err != nil {
		t.Fatal(err)
	}
	checkLimits(t, got, hostOnly)
}

func TestDetectLimitsCgroupV2ParentTighter(t *testing.T) {
	got, err := detectFromTree(t, map[string]string{
		"proc/self/cgroup":    "0::/kubepods/pod1/container\n",
		"proc/self/mountinfo": mountV2,
		// The root cgroup has no limit files.
		"sys/fs/cgroup/kubepods/memory.max":                "max\n",
		"sys/fs/cgroup/kubepods/cpu.max":                   "max 100000\n",
		"sys/fs/cgroup/kubepods/pod1/memory.max":           "268435456\n",
		"sys/fs/cgroup/kubepods/pod1/cpu.max":              "50000 100000\n",
		"sys/fs/cgroup/kubepods/pod1/container/memory.max": "1073741824\n",
		"sys/fs/cgroup/kubepods/pod1/container/cpu.max":    "200000 100000\n",
	})
	if err != nil {
		t.Fatal(err)
	}
	checkLimits(t, got, Limits{
		MemoryBytes:  256 * mib,
		MemorySource: "cgroup v2 memory.max",
		CPUCores:     0.5,
		CPUSource:    "cgroup v2 cpu.max",
	})
}

func TestDetectLimitsCgroupV2LeafTighter(t *testing.T) {
	got, err := detectFromTree(t, map[string]string{
		"proc/self/cgroup":                       "0::/pod/container\n",
		"proc/self/mountinfo":                    mountV2,
		"sys/fs/cgroup/pod/memory.max":           "1073741824\n",
		"sys/fs/cgroup/pod/cpu.max":              "400000 100000\n",
		"sys/fs/cgroup/pod/container/memory.max": "134217728\n",
		"sys/fs/cgroup/pod/container/cpu.max":    "25000 50000\n",
	})
	if err != nil {
		t.Fatal(err)
	}
	checkLimits(t, got, Limits{
		MemoryBytes:  128 * mib,
		MemorySource: "cgroup v2 memory.max",
		CPUCores:     0.5,
		CPUSource:    "cgroup v2 cpu.max",
	})
}

// In a private cgroup namespace, as Docker sets up by default on cgroup v2,
// /proc/self/cgroup shows the process's own cgroup as "/", and its limit
// files are at the mount point.
func TestDetectLimitsCgroupV2Namespace(t *testing.T) {
	got, err := detectFromTree(t, map[string]string{
		"proc/self/cgroup":         "0::/\n",
		"proc/self/mountinfo":      mountV2,
		"sys/fs/cgroup/memory.max": "2147483648\n",
		"sys/fs/cgroup/cpu.max":    "100000 100000\n",
	})
	if err != nil {
		t.Fatal(err)
	}
	checkLimits(t, got, Limits{
		MemoryBytes:  2 * gib,
		MemorySource: "cgroup v2 memory.max",
		CPUCores:     1,
		CPUSource:    "cgroup v2 cpu.max",
	})
}

// A cgroup path outside the process's cgroup namespace cannot be reached
// through any mount, so it sets no limit.
func TestDetectLimitsCgroupOutsideNamespace(t *testing.T) {
	got, err := detectFromTree(t, map[string]string{
		"proc/self/cgroup":         "0::/../other\n",
		"proc/self/mountinfo":      mountV2,
		"sys/fs/cgroup/memory.max": "1048576\n",
		"sys/fs/cgroup/cpu.max":    "10000 100000\n",
	})
	if err != nil {
		t.Fatal(err)
	}
	checkLimits(t, got, hostOnly)
}

// A container runtime that bind-mounts the container's cgroup sets the mount
// root to it, so the limits sit at the mount point and not at
// <mount point>/<cgroup path>.
func TestDetectLimitsCgroupV1BindMount(t *testing.T) {
	got, err := detectFromTree(t, map[string]string{
		"proc/self/cgroup": "12:pids:/docker/abc\n" +
			"4:memory:/docker/abc\n" +
			"2:cpu,cpuacct:/docker/abc\n" +
			"1:name=systemd:/docker/abc\n",
		"proc/self/mountinfo": mountProc +
			"35 31 0:32 /docker/abc /sys/fs/cgroup/memory ro,nosuid - cgroup cgroup rw,memory\n" +
			"32 31 0:29 /docker/abc /sys/fs/cgroup/cpu,cpuacct ro,nosuid - cgroup cgroup rw,cpu,cpuacct\n",
		"sys/fs/cgroup/memory/memory.limit_in_bytes":  "268435456\n",
		"sys/fs/cgroup/cpu,cpuacct/cpu.cfs_quota_us":  "200000\n",
		"sys/fs/cgroup/cpu,cpuacct/cpu.cfs_period_us": "100000\n",
	})
	if err != nil {
		t.Fatal(err)
	}
	checkLimits(t, got, Limits{
		MemoryBytes:  256 * mib,
		MemorySource: "cgroup v1 memory.limit_in_bytes",
		CPUCores:     2,
		CPUSource:    "cgroup v1 cpu.cfs_quota_us",
	})
}

func TestDetectLimitsCgroupV1ParentTighter(t *testing.T) {
	got, err := detectFromTree(t, map[string]string{
		"proc/self/cgroup":    "4:memory:/batch/job\n2:cpu,cpuacct:/batch/job\n",
		"proc/self/mountinfo": mountV1Memory + mountV1CPU,
		// The root cgroup reports no limit as the largest page-aligned int64.
		"sys/fs/cgroup/memory/memory.limit_in_bytes":               "9223372036854771712\n",
		"sys/fs/cgroup/memory/batch/memory.limit_in_bytes":         "104857600\n",
		"sys/fs/cgroup/memory/batch/memory.use_hierarchy":          "1\n",
		"sys/fs/cgroup/memory/batch/job/memory.limit_in_bytes":     "209715200\n",
		"sys/fs/cgroup/memory/batch/job/memory.use_hierarchy":      "1\n",
		"sys/fs/cgroup/cpu,cpuacct/cpu.cfs_quota_us":               "-1\n",
		"sys/fs/cgroup/cpu,cpuacct/cpu.cfs_period_us":              "100000\n",
		"sys/fs/cgroup/cpu,cpuacct/batch/cpu.cfs_quota_us":         "75000\n",
		"sys/fs/cgroup/cpu,cpuacct/batch/cpu.cfs_period_us":        "100000\n",
		"sys/fs/cgroup/cpu,cpuacct/batch/job/cpu.cfs_quota_us":     "-1\n",
		"sys/fs/cgroup/cpu,cpuacct/batch/job/cpu.cfs_period_us":    "100000\n",
		"sys/fs/cgroup/cpu,cpuacct/batch/job/cpu.cfs_burst_us":     "0\n",
		"sys/fs/cgroup/cpu,cpuacct/batch/job/cpuacct.usage":        "123456\n",
		"sys/fs/cgroup/memory/batch/job/memory.usage_in_bytes":     "1048576\n",
		"sys/fs/cgroup/memory/batch/job/memory.max_usage_in_bytes": "2097152\n",
	})
	if err != nil {
		t.Fatal(err)
	}
	checkLimits(t, got, Limits{
		MemoryBytes:  100 * mib,
		MemorySource: "cgroup v1 memory.limit_in_bytes",
		CPUCores:     0.75,
		CPUSource:    "cgroup v1 cpu.cfs_quota_us",
	})
}

// A v1 memory cgroup whose memory.use_hierarchy is 0 does not charge its
// children's memory to its own limit, so that limit does not apply.
func TestDetectLimitsCgroupV1NoHierarchy(t *testing.T) {
	got, err := detectFromTree(t, map[string]string{
		"proc/self/cgroup":                                     "4:memory:/batch/job\n",
		"proc/self/mountinfo":                                  mountV1Memory,
		"sys/fs/cgroup/memory/memory.limit_in_bytes":           "9223372036854771712\n",
		"sys/fs/cgroup/memory/batch/memory.limit_in_bytes":     "104857600\n",
		"sys/fs/cgroup/memory/batch/memory.use_hierarchy":      "0\n",
		"sys/fs/cgroup/memory/batch/job/memory.limit_in_bytes": "209715200\n",
		"sys/fs/cgroup/memory/batch/job/memory.use_hierarchy":  "0\n",
	})
	if err != nil {
		t.Fatal(err)
	}
	checkLimits(t, got, Limits{
		MemoryBytes:  200 * mib,
		MemorySource: "cgroup v1 memory.limit_in_bytes",
		CPUCores:     float64(testHost.gomaxprocs),
		CPUSource:    "GOMAXPROCS",
	})
}

func TestDetectLimitsCgroupV1Unlimited(t *testing.T) {
	got, err := detectFromTree(t, map[string]string{
		"proc/self/cgroup":    "4:memory:/\n2:cpu,cpuacct:/\n",
		"proc/self/mountinfo": mountV1Memory + mountV1CPU,
		// 64 KiB pages round the "no limit" value down further.
		"sys/fs/cgroup/memory/memory.limit_in_bytes":  "9223372036854710272\n",
		"sys/fs/cgroup/cpu,cpuacct/cpu.cfs_quota_us":  "-1\n",
		"sys/fs/cgroup/cpu,cpuacct/cpu.cfs_period_us": "100000\n",
	})
	if err != nil {
		t.Fatal(err)
	}
	checkLimits(t, got, hostOnly)
}

// On a hybrid system the v2 hierarchy exists but has no controllers, and the
// v1 hierarchies own the limits.
func TestDetectLimitsHybrid(t *testing.T) {
	got, err := detectFromTree(t, map[string]string{
		"proc/self/cgroup":                               "4:memory:/job\n2:cpu,cpuacct:/\n0::/\n",
		"proc/self/mountinfo":                            mountV1Memory + mountV1CPU + mountHybridV2,
		"sys/fs/cgroup/unified/cgroup.controllers":       "",
		"sys/fs/cgroup/unified/cpu.pressure":             "some avg10=0.00 avg60=0.00 avg300=0.00 total=0\n",
		"sys/fs/cgroup/memory/job/memory.limit_in_bytes": "536870912\n",
		"sys/fs/cgroup/cpu,cpuacct/cpu.cfs_quota_us":     "-1\n",
		"sys/fs/cgroup/cpu,cpuacct/cpu.cfs_period_us":    "100000\n",
	})
	if err != nil {
		t.Fatal(err)
	}
	checkLimits(t, got, Limits{
		MemoryBytes:  512 * mib,
		MemorySource: "cgroup v1 memory.limit_in_bytes",
		CPUCores:     float64(testHost.gomaxprocs),
		CPUSource:    "GOMAXPROCS",
	})
}

// The kernel writes a space in a mount point as "\040".
func TestDetectLimitsEscapedMountPoint(t *testing.T) {
	got, err := detectFromTree(t, map[string]string{
		"proc/self/cgroup":     "0::/app\n",
		"proc/self/mountinfo":  `30 23 0:26 / /cg\040v2 rw - cgroup2 cgroup2 rw` + "\n",
		"cg v2/app/memory.max": "1073741824\n",
		"cg v2/app/cpu.max":    "300000 100000\n",
		// A reader that ignored mountinfo would find this file instead.
		"sys/fs/cgroup/app/cpu.max": "100000 100000\n",
	})
	if err != nil {
		t.Fatal(err)
	}
	checkLimits(t, got, Limits{
		MemoryBytes:  gib,
		MemorySource: "cgroup v2 memory.max",
		CPUCores:     3,
		CPUSource:    "cgroup v2 cpu.max",
	})
}

func TestDetectLimitsMissingFiles(t *testing.T) {
	tests := []struct {
		name  string
		files map[string]string
	}{
		{"no proc", map[string]string{
			"sys/fs/cgroup/memory.max": "1048576\n",
		}},
		{"no mountinfo", map[string]string{
			"proc/self/cgroup":         "0::/\n",
			"sys/fs/cgroup/memory.max": "1048576\n",
		}},
		{"no cgroup mount", map[string]string{
			"proc/self/cgroup":         "0::/\n",
			"proc/self/mountinfo":      mountProc,
			"sys/fs/cgroup/memory.max": "1048576\n",
		}},
		{"no limit files", map[string]string{
			"proc/self/cgroup":               "0::/app\n",
			"proc/self/mountinfo":            mountV2,
			"sys/fs/cgroup/app/cgroup.procs": "42\n",
		}},
		{"no cgroup directory", map[string]string{
			"proc/self/cgroup":    "0::/deleted\n",
			"proc/self/mountinfo": mountV2,
		}},
		{"v1 controller not mounted", map[string]string{
			"proc/self/cgroup":                               "4:memory:/job\n2:cpu,cpuacct:/job\n",
			"proc/self/mountinfo":                            mountV1CPU,
			"sys/fs/cgroup/memory/job/memory.limit_in_bytes": "1048576\n",
		}},
		{"mount root elsewhere", map[string]string{
			"proc/self/cgroup":                           "4:memory:/docker/b\n",
			"proc/self/mountinfo":                        "35 31 0:32 /docker/a /sys/fs/cgroup/memory rw - cgroup cgroup rw,memory\n",
			"sys/fs/cgroup/memory/memory.limit_in_bytes": "1048576\n",
		}},
	}
	for _, test := range tests {
		t.Run(test.name, func(t *testing.T) {
			got, err := detectFromTree(t, test.files)
			if err != nil {
				t.Fatal(err)
			}
			checkLimits(t, got, hostOnly)
		})
	}
}

func TestDetectLimitsGarbage(t *testing.T) {
	tests := []struct {
		name string
		// files are added to a cgroup v2 tree for "0::/app" or a v1 tree for
		// "/job", so each case names only the broken file.
		files map[string]string
		// wantFile and wantValue must both appear in the error.
		wantFile  string
		wantValue string
	}{
		{"v2 memory word", map[string]string{"sys/fs/cgroup/app/memory.max": "lots\n"},
			"sys/fs/cgroup/app/memory.max", `"lots"`},
		{"v2 memory negative", map[string]string{"sys/fs/cgroup/memory.max": "-5\n"},
			"sys/fs/cgroup/memory.max", `"-5"`},
		{"v2 memory zero", map[string]string{"sys/fs/cgroup/app/memory.max": "0\n"},
			"sys/fs/cgroup/app/memory.max", `"0"`},
		{"v2 cpu one field", map[string]string{"sys/fs/cgroup/app/cpu.max": "100000\n"},
			"sys/fs/cgroup/app/cpu.max", `"100000"`},
		{"v2 cpu quota word", map[string]string{"sys/fs/cgroup/app/cpu.max": "fast 100000\n"},
			"sys/fs/cgroup/app/cpu.max", `"fast"`},
		{"v2 cpu period zero", map[string]string{"sys/fs/cgroup/app/cpu.max": "50000 0\n"},
			"sys/fs/cgroup/app/cpu.max", `"0"`},
		{"v1 memory word", map[string]string{"sys/fs/cgroup/memory/job/memory.limit_in_bytes": "12x\n"},
			"sys/fs/cgroup/memory/job/memory.limit_in_bytes", `"12x"`},
		{"v1 use_hierarchy", map[string]string{"sys/fs/cgroup/memory/memory.use_hierarchy": "yes\n"},
			"sys/fs/cgroup/memory/memory.use_hierarchy", `"yes"`},
		{"v1 quota word", map[string]string{"sys/fs/cgroup/cpu,cpuacct/job/cpu.cfs_quota_us": "fast\n"},
			"sys/fs/cgroup/cpu,cpuacct/job/cpu.cfs_quota_us", `"fast"`},
		{"v1 quota below -1", map[string]string{"sys/fs/cgroup/cpu,cpuacct/job/cpu.cfs_quota_us": "-2\n"},
			"sys/fs/cgroup/cpu,cpuacct/job/cpu.cfs_quota_us", `"-2"`},
		{"v1 period empty", map[string]string{
			"sys/fs/cgroup/cpu,cpuacct/job/cpu.cfs_quota_us":  "50000\n",
			"sys/fs/cgroup/cpu,cpuacct/job/cpu.cfs_period_us": "\n",
		}, "sys/fs/cgroup/cpu,cpuacct/job/cpu.cfs_period_us", `""`},
		{"v1 period missing", map[string]string{
			"sys/fs/cgroup/cpu,cpuacct/cpu.cfs_quota_us": "50000\n",
		}, "sys/fs/cgroup/cpu,cpuacct/cpu.cfs_period_us", "50000"},
		{"proc cgroup line", map[string]string{"proc/self/cgroup": "0::/app\nnonsense\n"},
			"proc/self/cgroup", `"nonsense"`},
		{"proc cgroup relative path", map[string]string{"proc/self/cgroup": "0::app\n"},
			"proc/self/cgroup", `"0::app"`},
		{"mountinfo no separator", map[string]string{"proc/self/mountinfo": mountV2 + "31 23 0:27 / /x rw cgroup2\n"},
			"proc/self/mountinfo", `"31 23 0:27 / /x rw cgroup2"`},
		{"mountinfo bad escape", map[string]string{"proc/self/mountinfo": `30 23 0:26 / /cg\09 rw - cgroup2 cgroup2 rw` + "\n"},
			"proc/self/mountinfo", `\\09`},
	}
	for _, test := range tests {
		t.Run(test.name, func(t *testing.T) {
			root := t.TempDir()
			writeTree(t, root, map[string]string{
				"proc/self/cgroup":    "0::/app\n4:memory:/job\n2:cpu,cpuacct:/job\n",
				"proc/self/mountinfo": mountV2 + mountV1Memory + mountV1CPU,
			})
			writeTree(t, root, test.files)

			_, err := detectLimitsFrom(root, testHost)
			if err == nil {
				t.Fatal("detectLimitsFrom returned no error")
			}
			wantFile := filepath.Join(root, filepath.FromSlash(test.wantFile))
			if !strings.Contains(err.Error(), wantFile) {
				t.Errorf("error %q does not name the file %s", err, wantFile)
			}
			if !strings.Contains(err.Error(), test.wantValue) {
				t.Errorf("error %q does not contain the value %s", err, test.wantValue)
			}
		})
	}
}

func TestApplyHostLimitsCapsCgroup(t *testing.T) {
	host := hostLimits{memoryBytes: 8 * gib, gomaxprocs: 2, numCPU: 2}
	cgroup := Limits{
		MemoryBytes:  32 * gib,
		MemorySource: "cgroup v2 memory.max",
		CPUCores:     8,
		CPUSource:    "cgroup v2 cpu.max",
	}
	checkLimits(t, applyHostLimits(cgroup, host), Limits{
		MemoryBytes:  8 * gib,
		MemorySource: "host memory (smaller than cgroup v2 memory.max)",
		CPUCores:     2,
		CPUSource:    "runtime.NumCPU (smaller than cgroup v2 cpu.max)",
	})
}

func TestApplyHostLimitsKeepsCgroup(t *testing.T) {
	cgroup := Limits{
		MemoryBytes:  gib,
		MemorySource: "cgroup v1 memory.limit_in_bytes",
		CPUCores:     1.25,
		CPUSource:    "cgroup v1 cpu.cfs_quota_us",
	}
	checkLimits(t, applyHostLimits(cgroup, testHost), cgroup)
}

// TestDetectLimitsRealMachine checks only that the result is plausible,
// because the limits depend on the machine the tests run on.
func TestDetectLimitsRealMachine(t *testing.T) {
	limits, err := DetectLimits()
	if err != nil {
		t.Fatal(err)
	}
	t.Logf("limits: %+v", limits)
	if limits.MemoryBytes <= 0 {
		t.Errorf("MemoryBytes = %d, want > 0", limits.MemoryBytes)
	}
	if limits.MemorySource == "" {
		t.Error("MemorySource is empty")
	}
	if limits.CPUCores <= 0 {
		t.Errorf("CPUCores = %v, want > 0", limits.CPUCores)
	}
	if limits.CPUSource == "" {
		t.Error("CPUSource is empty")
	}
}
