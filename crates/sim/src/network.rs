//! The simulated network: what a message costs on a worker's link, and on the servers' links.

use serde::{Deserialize, Serialize};

/// Message delay: a fixed latency plus size over bandwidth.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NetworkModel {
    /// One-way latency in seconds.
    #[serde(default)]
    pub latency: f64,
    /// Bytes per second of each worker's link; `None` is infinite bandwidth.
    #[serde(default)]
    pub bandwidth: Option<f64>,
    /// Bytes per second of each parameter server's link, each way; `None`: infinite (the
    /// servers' links never queue). Every parameter pull and gradient push crosses it.
    #[serde(default)]
    pub server_bandwidth: Option<f64>,
    /// Extra delay of each message to or from a parameter server: exponential with this mean,
    /// seconds, drawn per message (and per server), so that servers see messages in
    /// different orders, as on a real network.
    #[serde(default)]
    pub jitter: f64,
    /// Parameter servers the model is split over: a message to or from "the server" is
    /// `shards` messages, each of its shard's part, one per server link, in parallel. With
    /// more than one the simulator runs the sharded rule (a coordinator and a shard per
    /// server, one `latency` apart), as the networked servers do.
    #[serde(default = "one")]
    pub shards: u32,
}

fn one() -> u32 {
    1
}

impl Default for NetworkModel {
    fn default() -> Self {
        NetworkModel { latency: 0.0, bandwidth: None, server_bandwidth: None, jitter: 0.0, shards: 1 }
    }
}

impl NetworkModel {
    /// Seconds for a message of `bytes` to arrive over a worker's link.
    pub fn delay(&self, bytes: usize) -> f64 {
        self.latency + self.bandwidth.map_or(0.0, |bw| bytes as f64 / bw)
    }

    /// Seconds one server link is busy with a message of `bytes` (its shard's part of it).
    pub fn server_seconds(&self, bytes: usize) -> f64 {
        self.server_bandwidth.map_or(0.0, |bw| bytes as f64 / f64::from(self.shards.max(1)) / bw)
    }
}

/// The servers' links in one direction: first come, first served. The model is split evenly,
/// so every server's link carries the same load and one queue stands for all of them.
#[derive(Debug, Clone, Default)]
pub struct ServerLink {
    free_at: f64,
}

impl ServerLink {
    /// A message of `busy` link-seconds handed to the link at `now`: the seconds until it
    /// has crossed and travelled `latency` beyond.
    pub fn through(&mut self, now: f64, busy: f64, latency: f64) -> f64 {
        self.send(now, busy) - now + latency
    }

    /// A message of `busy` link-seconds handed to the link at `now`: when it has crossed.
    pub fn send(&mut self, now: f64, busy: f64) -> f64 {
        if busy <= 0.0 {
            return now;
        }
        self.free_at = self.free_at.max(now) + busy;
        self.free_at
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn network_delay_is_latency_plus_size_over_bandwidth() {
        let n = NetworkModel { latency: 0.001, bandwidth: Some(1e9), ..NetworkModel::default() };
        assert!((n.delay(4_000_000) - 0.005).abs() < 1e-12);
    }

    #[test]
    fn a_server_link_queues_messages_and_shards_split_them() {
        let one = NetworkModel { server_bandwidth: Some(1e9), ..NetworkModel::default() };
        let four = NetworkModel { shards: 4, ..one.clone() };
        assert!((one.server_seconds(100_000_000) - 0.1).abs() < 1e-12);
        assert!((four.server_seconds(100_000_000) - 0.025).abs() < 1e-12);
        let mut link = ServerLink::default();
        // Three 0.1 s messages at once leave one after the other; a later one waits for none.
        let done: Vec<f64> = (0..3).map(|_| link.send(1.0, 0.1)).collect();
        assert!((done[2] - 1.3).abs() < 1e-12, "{done:?}");
        assert!((link.send(5.0, 0.1) - 5.1).abs() < 1e-12);
        assert_eq!(link.send(6.0, 0.0), 6.0);
    }
}
