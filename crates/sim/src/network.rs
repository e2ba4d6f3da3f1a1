//! The simulated network: what a message costs on a worker's link.

use serde::{Deserialize, Serialize};

/// Message delay: a fixed latency plus size over bandwidth.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NetworkModel {
    /// One-way latency in seconds.
    #[serde(default)]
    pub latency: f64,
    /// Bytes per second; `None` is infinite bandwidth.
    #[serde(default)]
    pub bandwidth: Option<f64>,
}

impl Default for NetworkModel {
    fn default() -> Self {
        NetworkModel { latency: 0.0, bandwidth: None }
    }
}

impl NetworkModel {
    /// Seconds for a message of `bytes` to arrive.
    pub fn delay(&self, bytes: usize) -> f64 {
        self.latency + self.bandwidth.map_or(0.0, |bw| bytes as f64 / bw)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn network_delay_is_latency_plus_size_over_bandwidth() {
        let n = NetworkModel { latency: 0.001, bandwidth: Some(1e9) };
        assert!((n.delay(4_000_000) - 0.005).abs() < 1e-12);
    }
}
