package asynqlimit

import "github.com/prometheus/client_golang/prometheus"

// processMetrics holds the metrics of the process monitor. They are
// registered even when Limits.Process sets no threshold, and then read 0.
type processMetrics struct {
	rss           prometheus.Gauge
	cpu           prometheus.Gauge
	limit         *prometheus.GaugeVec
	pressure      *prometheus.GaugeVec
	samplerErrors prometheus.Counter
}

func newProcessMetrics() *processMetrics {
	pm := &processMetrics{
		rss: prometheus.NewGauge(prometheus.GaugeOpts{
			Namespace: namespace, Name: "process_resident_memory_bytes",
			Help: "Resident memory of the worker process at the last sample.",
		}),
		cpu: prometheus.NewGauge(prometheus.GaugeOpts{
			Namespace: namespace, Name: "process_cpu_cores",
			Help: "CPU use of the worker process over the last sample interval, in cores.",
		}),
		limit: prometheus.NewGaugeVec(prometheus.GaugeOpts{
			Namespace: namespace, Name: "process_limit",
			Help: "Process pressure thresholds, in bytes for memory and cores for cpu; 0 means off.",
		}, []string{"resource", "threshold"}),
		pressure: prometheus.NewGaugeVec(prometheus.GaugeOpts{
			Namespace: namespace, Name: "pressure",
			Help: "Process pressure by resource: 0 none, 1 soft, 2 hard.",
		}, []string{"resource"}),
		samplerErrors: prometheus.NewCounter(prometheus.CounterOpts{
			Namespace: namespace, Name: "sampler_errors_total",
			Help: "Failed samples of the process's resource use.",
		}),
	}
	for _, r := range []string{"memory", "cpu"} {
		pm.pressure.WithLabelValues(r)
		for _, th := range []string{"soft", "hard"} {
			pm.limit.WithLabelValues(r, th)
		}
	}
	return pm
}

func (pm *processMetrics) collectors() []prometheus.Collector {
	return []prometheus.Collector{pm.rss, pm.cpu, pm.limit, pm.pressure, pm.samplerErrors}
}

// setLimits reports the resolved thresholds.
func (pm *processMetrics) setLimits(memory, cpu threshold) {
	pm.limit.WithLabelValues("memory", "soft").Set(memory.soft)
	pm.limit.WithLabelValues("memory", "hard").Set(memory.hard)
	pm.limit.WithLabelValues("cpu", "soft").Set(cpu.soft)
	pm.limit.WithLabelValues("cpu", "hard").Set(cpu.hard)
}
