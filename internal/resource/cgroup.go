package resource

import (
	"bufio"
	"errors"
	"fmt"
	"io/fs"
	"os"
	"path"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
)

// Sources of a cgroup limit, as stored in Limits.MemorySource and
// Limits.CPUSource.
const (
	sourceCgroupV2Memory = "cgroup v2 memory.max"
	sourceCgroupV2CPU    = "cgroup v2 cpu.max"
	sourceCgroupV1Memory = "cgroup v1 memory.limit_in_bytes"
	sourceCgroupV1CPU    = "cgroup v1 cpu.cfs_quota_us"
)

// v1UnlimitedMemory is the smallest cgroup v1 memory.limit_in_bytes value
// treated as no limit. The kernel reports "no limit" as the largest
// page-aligned int64 (9223372036854771712 with 4 KiB pages), and no machine
// has memory near 2^62 bytes (4 EiB).
const v1UnlimitedMemory = 1 << 62

// cgroupMembership is the process's cgroup in one hierarchy, parsed from one
// line of /proc/self/cgroup.
type cgroupMembership struct {
	// hierarchyID is "0" for the cgroup v2 hierarchy.
	hierarchyID string
	// controllers lists the v1 controllers bound to the hierarchy, such as
	// "memory" or "cpu". It is empty for cgroup v2.
	controllers []string
	// path is the cgroup relative to the root of its hierarchy, starting with
	// "/". A path that starts with "/.." lies outside this process's cgroup
	// namespace.
	path string
}

// cgroupMount is one cgroup or cgroup2 line of /proc/self/mountinfo.
type cgroupMount struct {
	// root is the directory of the hierarchy that is mounted, such as "/" or
	// "/docker/<id>".
	root string
	// mountPoint is the directory that root is mounted on, such as
	// "/sys/fs/cgroup/memory".
	mountPoint string
	// fsType is "cgroup" (v1) or "cgroup2".
	fsType string
	// superOptions are the comma-separated super block options, which name
	// the controllers of a v1 mount.
	superOptions []string
}

// cgroupLimitSet is the parsed content of /proc/self/cgroup and
// /proc/self/mountinfo under one root directory.
type cgroupLimitSet struct {
	root        string
	memberships []cgroupMembership
	mounts      []cgroupMount
}

// readCgroupLimits reads the memory and CPU limits of this process's cgroups
// from the /proc and /sys trees under root, which is "/" on a real machine.
// A limit that no cgroup sets stays 0 with an empty source. A missing
// /proc/self/cgroup or /proc/self/mountinfo means the process is in no
// cgroup, which is not an error.
func readCgroupLimits(root string) (Limits, error) {
	memberships, err := readProcCgroup(filepath.Join(root, "proc", "self", "cgroup"))
	if errors.Is(err, fs.ErrNotExist) {
		return Limits{}, nil
	}
	if err != nil {
		return Limits{}, err
	}
	mounts, err := readCgroupMounts(filepath.Join(root, "proc", "self", "mountinfo"))
	if errors.Is(err, fs.ErrNotExist) {
		return Limits{}, nil
	}
	if err != nil {
		return Limits{}, err
	}
	set := cgroupLimitSet{root: root, memberships: memberships, mounts: mounts}

	var limits Limits
	limits.MemoryBytes, limits.MemorySource, err = set.memoryLimit()
	if err != nil {
		return Limits{}, err
	}
	limits.CPUCores, limits.CPUSource, err = set.cpuLimit()
	if err != nil {
		return Limits{}, err
	}
	return limits, nil
}

// memoryLimit returns the smallest memory limit in bytes of this process's
// cgroup and its ancestors, trying cgroup v2 before v1. It returns 0 and an
// empty source if no cgroup sets one.
//
// NOTE: cgroup v2 memory.high is not read. The kernel throttles and reclaims
// a cgroup above memory.high, so where it is set below memory.max the
// process slows down before it reaches the limit returned here.
func (s cgroupLimitSet) memoryLimit() (int64, string, error) {
	limit, err := smallestLimit(s.cgroupDirs("cgroup2", ""), "memory.max", parseV2Memory)
	if err != nil {
		return 0, "", err
	}
	if limit > 0 {
		return limit, sourceCgroupV2Memory, nil
	}

	dirs, err := hierarchicalMemoryDirs(s.cgroupDirs("cgroup", "memory"))
	if err != nil {
		return 0, "", err
	}
	limit, err = smallestLimit(dirs, "memory.limit_in_bytes", parseV1Memory)
	if err != nil {
		return 0, "", err
	}
	if limit > 0 {
		return limit, sourceCgroupV1Memory, nil
	}
	return 0, "", nil
}

// cpuLimit returns the smallest CPU bandwidth limit in cores of this
// process's cgroup and its ancestors, trying cgroup v2 before v1. It returns
// 0 and an empty source if no cgroup sets one.
func (s cgroupLimitSet) cpuLimit() (float64, string, error) {
	limit, err := smallestLimit(s.cgroupDirs("cgroup2", ""), "cpu.max", parseV2CPU)
	if err != nil {
		return 0, "", err
	}
	if limit > 0 {
		return limit, sourceCgroupV2CPU, nil
	}

	limit, err = smallestLimit(s.cgroupDirs("cgroup", "cpu"), "cpu.cfs_quota_us", readV1CPU)
	if err != nil {
		return 0, "", err
	}
	if limit > 0 {
		return limit, sourceCgroupV1CPU, nil
	}
	return 0, "", nil
}

// smallestLimit reads the file named file in each of dirs with parse and
// returns the smallest positive limit, or 0 if none of them sets one. parse
// returns 0 for "no limit". A missing file sets no limit, because the kernel
// omits limit files in the root cgroup and where a controller is not
// enabled.
func smallestLimit[T int64 | float64](dirs []string, file string, parse func(dir, name string, contents []byte) (T, error)) (T, error) {
	var smallest T
	for _, dir := range dirs {
		name := filepath.Join(dir, file)
		contents, err := os.ReadFile(name)
		if errors.Is(err, fs.ErrNotExist) {
			continue
		}
		if err != nil {
			return 0, fmt.Errorf("read cgroup limit: %w", err)
		}
		limit, err := parse(dir, name, contents)
		if err != nil {
			return 0, err
		}
		if limit > 0 && (smallest == 0 || limit < smallest) {
			smallest = limit
		}
	}
	return smallest, nil
}

// cgroupDirs returns the directories of this process's cgroup and of each
// ancestor visible through the mount, leaf first. fsType is "cgroup2" for v2
// or "cgroup" for a v1 hierarchy with the given controller. It returns nil
// if the process is in no such cgroup or no mount reaches it.
func (s cgroupLimitSet) cgroupDirs(fsType, controller string) []string {
	membership, ok := s.membership(fsType, controller)
	if !ok {
		return nil
	}
	for _, mount := range s.mounts {
		if mount.fsType != fsType {
			continue
		}
		if fsType == "cgroup" && !slices.Contains(mount.superOptions, controller) {
			continue
		}
		relative, ok := relativeCgroupPath(membership.path, mount.root)
		if !ok {
			continue
		}
		// Walk from the leaf up to the mount point. Ancestors above the
		// mount root are not visible, which is how container runtimes hide
		// the host's cgroups.
		var dirs []string
		for {
			dirs = append(dirs, filepath.Join(s.root, filepath.FromSlash(mount.mountPoint), filepath.FromSlash(relative)))
			if relative == "/" {
				return dirs
			}
			relative = path.Dir(relative)
		}
	}
	return nil
}

// membership returns the /proc/self/cgroup line of the v2 hierarchy (fsType
// "cgroup2") or of the v1 hierarchy that has controller (fsType "cgroup").
func (s cgroupLimitSet) membership(fsType, controller string) (cgroupMembership, bool) {
	for _, m := range s.memberships {
		if fsType == "cgroup2" && m.hierarchyID == "0" {
			return m, true
		}
		if fsType == "cgroup" && m.hierarchyID != "0" && slices.Contains(m.controllers, controller) {
			return m, true
		}
	}
	return cgroupMembership{}, false
}

// relativeCgroupPath returns cgroupPath relative to mountRoot, as a path
// starting with "/". It returns false if the mount does not contain the
// cgroup, for example a mount of /docker/a for the cgroup /docker/b, or a
// cgroup outside this process's cgroup namespace ("/../init").
func relativeCgroupPath(cgroupPath, mountRoot string) (string, bool) {
	if cgroupPath == "/.." || strings.HasPrefix(cgroupPath, "/../") {
		return "", false
	}
	if mountRoot == "/" {
		return cgroupPath, true
	}
	if cgroupPath == mountRoot {
		return "/", true
	}
	relative, ok := strings.CutPrefix(cgroupPath, mountRoot+"/")
	if !ok {
		return "", false
	}
	return "/" + relative, true
}

// hierarchicalMemoryDirs drops the v1 ancestors whose memory limit does not
// cover their children. dirs is leaf first. A v1 memory cgroup charges its
// children's memory to its own limit only if its memory.use_hierarchy is 1.
// The kernel rejects 0 below a parent with 1, so every ancestor above the
// first 0 has 0 too. A missing memory.use_hierarchy counts as 1.
func hierarchicalMemoryDirs(dirs []string) ([]string, error) {
	for i := 1; i < len(dirs); i++ {
		name := filepath.Join(dirs[i], "memory.use_hierarchy")
		contents, err := os.ReadFile(name)
		if errors.Is(err, fs.ErrNotExist) {
			continue
		}
		if err != nil {
			return nil, fmt.Errorf("read cgroup limit: %w", err)
		}
		value := strings.TrimSpace(string(contents))
		switch value {
		case "1":
			continue
		case "0":
			return dirs[:i], nil
		default:
			return nil, fmt.Errorf("invalid value %q in %s: want 0 or 1", value, name)
		}
	}
	return dirs, nil
}

// parseV2Memory parses a cgroup v2 memory.max file: a byte count, or "max"
// for no limit (returned as 0).
func parseV2Memory(_, name string, contents []byte) (int64, error) {
	value := strings.TrimSpace(string(contents))
	if value == "max" {
		return 0, nil
	}
	bytes, err := strconv.ParseInt(value, 10, 64)
	if err != nil || bytes <= 0 {
		return 0, fmt.Errorf("invalid value %q in %s: want a positive byte count or \"max\"", value, name)
	}
	return bytes, nil
}

// parseV1Memory parses a cgroup v1 memory.limit_in_bytes file: a byte count,
// where -1 or a value of at least v1UnlimitedMemory means no limit (returned
// as 0).
func parseV1Memory(_, name string, contents []byte) (int64, error) {
	value := strings.TrimSpace(string(contents))
	bytes, err := strconv.ParseInt(value, 10, 64)
	if err != nil || bytes == 0 || bytes < -1 {
		return 0, fmt.Errorf("invalid value %q in %s: want a positive byte count or -1", value, name)
	}
	if bytes == -1 || bytes >= v1UnlimitedMemory {
		return 0, nil
	}
	return bytes, nil
}

// parseV2CPU parses a cgroup v2 cpu.max file, "<quota> <period>" in
// microseconds, and returns quota/period in cores. A quota of "max" means no
// limit (returned as 0).
func parseV2CPU(_, name string, contents []byte) (float64, error) {
	value := strings.TrimSpace(string(contents))
	fields := strings.Fields(value)
	if len(fields) != 2 {
		return 0, fmt.Errorf("invalid value %q in %s: want \"<quota> <period>\" in microseconds, or \"max <period>\"", value, name)
	}
	if fields[0] == "max" {
		return 0, nil
	}
	quota, err := strconv.ParseInt(fields[0], 10, 64)
	if err != nil || quota <= 0 {
		return 0, fmt.Errorf("invalid quota %q in %s: want a positive number of microseconds or \"max\"", fields[0], name)
	}
	period, err := strconv.ParseInt(fields[1], 10, 64)
	if err != nil || period <= 0 {
		return 0, fmt.Errorf("invalid period %q in %s: want a positive number of microseconds", fields[1], name)
	}
	return float64(quota) / float64(period), nil
}

// readV1CPU parses a cgroup v1 cpu.cfs_quota_us file and reads
// cpu.cfs_period_us from the same directory, both in microseconds, and
// returns quota/period in cores. A quota of -1 means no limit (returned as
// 0), and then the period is not read.
func readV1CPU(dir, name string, contents []byte) (float64, error) {
	value := strings.TrimSpace(string(contents))
	quota, err := strconv.ParseInt(value, 10, 64)
	if err != nil || quota == 0 || quota < -1 {
		return 0, fmt.Errorf("invalid value %q in %s: want a positive number of microseconds or -1", value, name)
	}
	if quota == -1 {
		return 0, nil
	}

	periodName := filepath.Join(dir, "cpu.cfs_period_us")
	periodContents, err := os.ReadFile(periodName)
	if err != nil {
		return 0, fmt.Errorf("read cgroup v1 CPU period for quota %d in %s: %w", quota, name, err)
	}
	periodValue := strings.TrimSpace(string(periodContents))
	period, err := strconv.ParseInt(periodValue, 10, 64)
	if err != nil || period <= 0 {
		return 0, fmt.Errorf("invalid value %q in %s: want a positive number of microseconds", periodValue, periodName)
	}
	return float64(quota) / float64(period), nil
}

// readProcCgroup parses /proc/self/cgroup. Each line is
// "hierarchy-ID:controller-list:cgroup-path", as described in cgroups(7).
func readProcCgroup(name string) ([]cgroupMembership, error) {
	contents, err := os.ReadFile(name)
	if err != nil {
		return nil, err
	}
	var memberships []cgroupMembership
	for number, line := range strings.Split(strings.TrimRight(string(contents), "\n"), "\n") {
		if line == "" {
			continue
		}
		fields := strings.SplitN(line, ":", 3)
		if len(fields) != 3 || !strings.HasPrefix(fields[2], "/") {
			return nil, fmt.Errorf("invalid line %d %q in %s: want \"hierarchy-ID:controller-list:/cgroup-path\"", number+1, line, name)
		}
		m := cgroupMembership{hierarchyID: fields[0], path: fields[2]}
		if fields[1] != "" {
			m.controllers = strings.Split(fields[1], ",")
		}
		memberships = append(memberships, m)
	}
	return memberships, nil
}

// readCgroupMounts returns the cgroup and cgroup2 mounts listed in
// /proc/self/mountinfo, in file order. The line format is described in
// proc_pid_mountinfo(5):
//
//	36 35 98:0 /mnt1 /mnt2 rw,noatime master:1 - ext3 /dev/root rw,errors=continue
//
// Fields 4 and 5 are the mount root and mount point, and after the "-"
// separator come the filesystem type, the source and the super options.
func readCgroupMounts(name string) ([]cgroupMount, error) {
	file, err := os.Open(name)
	if err != nil {
		return nil, err
	}
	defer file.Close()

	var mounts []cgroupMount
	scanner := bufio.NewScanner(file)
	// Paths in mountinfo may be up to PATH_MAX (4096) bytes, and each escaped
	// byte takes four, so allow lines far longer than bufio's 64 KiB default.
	scanner.Buffer(nil, 1<<20)
	number := 0
	for scanner.Scan() {
		number++
		line := scanner.Text()
		mount, isCgroup, err := parseMountinfoLine(line)
		if err != nil {
			return nil, fmt.Errorf("invalid line %d %q in %s: %w", number, line, name, err)
		}
		if isCgroup {
			mounts = append(mounts, mount)
		}
	}
	if err := scanner.Err(); err != nil {
		return nil, fmt.Errorf("read %s: %w", name, err)
	}
	return mounts, nil
}

// parseMountinfoLine parses one line of /proc/self/mountinfo. It returns
// false for a mount whose filesystem type is neither cgroup nor cgroup2.
func parseMountinfoLine(line string) (cgroupMount, bool, error) {
	fields := strings.Fields(line)
	separator := slices.Index(fields, "-")
	if separator < 6 || len(fields) < separator+4 {
		return cgroupMount{}, false, errors.New(`want at least 6 fields, a "-" separator and 3 more fields`)
	}
	fsType := fields[separator+1]
	if fsType != "cgroup" && fsType != "cgroup2" {
		return cgroupMount{}, false, nil
	}
	root, err := unescapeMountPath(fields[3])
	if err != nil {
		return cgroupMount{}, false, err
	}
	mountPoint, err := unescapeMountPath(fields[4])
	if err != nil {
		return cgroupMount{}, false, err
	}
	if !strings.HasPrefix(root, "/") || !strings.HasPrefix(mountPoint, "/") {
		return cgroupMount{}, false, fmt.Errorf("want absolute mount root and mount point, got %q and %q", root, mountPoint)
	}
	mount := cgroupMount{
		root:         root,
		mountPoint:   mountPoint,
		fsType:       fsType,
		superOptions: strings.Split(fields[separator+3], ","),
	}
	return mount, true, nil
}

// unescapeMountPath undoes the octal escapes ("\040" for a space) that the
// kernel writes in mountinfo paths for space, tab, newline and backslash.
func unescapeMountPath(escaped string) (string, error) {
	if !strings.Contains(escaped, `\`) {
		return escaped, nil
	}
	var b strings.Builder
	for i := 0; i < len(escaped); i++ {
		if escaped[i] != '\\' {
			b.WriteByte(escaped[i])
			continue
		}
		if i+3 >= len(escaped) {
			return "", fmt.Errorf("invalid escape sequence in path %q: want a backslash and three octal digits", escaped)
		}
		code, err := strconv.ParseUint(escaped[i+1:i+4], 8, 8)
		if err != nil {
			return "", fmt.Errorf("invalid escape sequence %q in path %q: want a backslash and three octal digits", escaped[i:i+4], escaped)
		}
		b.WriteByte(byte(code))
		i += 3
	}
	return b.String(), nil
}
