//go:build linux

package resource

// detectPlatformLimits reads the cgroup limits of this process from the real
// /proc and /sys trees.
func detectPlatformLimits(host hostLimits) (Limits, error) {
	return detectLimitsFrom("/", host)
}
