//! Checkpoints written on a thread of their own, so the loop never waits for the disk.

use super::CheckpointOptions;
use crate::checkpoint;
use quorum_core::{ParamLayout, ServerConfig, ServerSnapshot};
use std::path::PathBuf;
use std::time::Instant;

/// Writes checkpoints on a thread of their own so the loop never waits for the disk.
pub(super) struct Checkpointer {
    pub(super) opts: CheckpointOptions,
    pub(super) tx: Option<std::sync::mpsc::Sender<ServerSnapshot>>,
    pub(super) thread: Option<std::thread::JoinHandle<Option<PathBuf>>>,
    pub(super) last_at: Instant,
}

impl Checkpointer {
    pub(super) fn start(
        opts: CheckpointOptions,
        layout: ParamLayout,
        cfg: ServerConfig,
        run_config: Option<String>,
    ) -> Self {
        let (tx, rx) = std::sync::mpsc::channel::<ServerSnapshot>();
        let (dir, keep) = (opts.dir.clone(), opts.keep);
        let thread = std::thread::spawn(move || {
            let mut last = None;
            while let Ok(mut snap) = rx.recv() {
                // Only the newest request matters when the disk falls behind.
                while let Ok(newer) = rx.try_recv() {
                    snap = newer;
                }
                match checkpoint::save(&dir, &snap, &layout, &cfg, run_config.as_deref(), keep) {
                    Ok(p) => last = Some(p),
                    Err(e) => tracing::warn!("checkpoint at step {} failed: {e}", snap.step),
                }
            }
            last
        });
        Checkpointer { opts, tx: Some(tx), thread: Some(thread), last_at: Instant::now() }
    }

    pub(super) fn due(&self, step: u64) -> bool {
        self.opts.every_steps.is_some_and(|k| k > 0 && step.is_multiple_of(k))
            || self.opts.every_seconds.is_some_and(|s| self.last_at.elapsed().as_secs_f64() >= s)
    }

    pub(super) fn request(&mut self, snap: ServerSnapshot) {
        self.last_at = Instant::now();
        if let Some(tx) = &self.tx {
            let _ = tx.send(snap);
        }
    }

    /// Writes the final checkpoint and waits for the thread; returns the last path written.
    pub(super) fn finish(mut self, snap: ServerSnapshot) -> Option<PathBuf> {
        self.request(snap);
        drop(self.tx.take());
        self.thread.take().and_then(|t| t.join().ok()).flatten()
    }
}
