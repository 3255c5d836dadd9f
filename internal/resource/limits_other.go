//go:build !linux

package resource

// detectPlatformLimits returns the host limits, because only Linux has
// cgroups.
func detectPlatformLimits(host hostLimits) (Limits, error) {
	return applyHostLimits(Limits{}, host), nil
}
