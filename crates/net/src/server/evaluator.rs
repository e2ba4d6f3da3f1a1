//! Evaluation on its own thread, so the protocol loop never waits for it.

use super::record::Recorder;
use quorum_compute::{Evaluation, GradientSource};
use std::sync::mpsc::{channel, Receiver, Sender};
use std::sync::Arc;
use std::thread::JoinHandle;

/// The evaluation thread and its two queues: parameters in, figures out.
pub(super) struct Evaluator {
    requests: Sender<(u64, Arc<Vec<f32>>)>,
    results: Receiver<(u64, Evaluation)>,
    thread: Option<JoinHandle<Box<dyn GradientSource + Send>>>,
}

impl Evaluator {
    /// Starts the thread; without a model to evaluate with, requests are dropped.
    pub(super) fn start(source: Option<Box<dyn GradientSource + Send>>) -> Self {
        let (requests, rx) = channel::<(u64, Arc<Vec<f32>>)>();
        let (tx, results) = channel::<(u64, Evaluation)>();
        let thread = source.map(|mut ev| {
            std::thread::spawn(move || {
                while let Ok((step, params)) = rx.recv() {
                    if let Ok(e) = ev.evaluate(&params) {
                        let _ = tx.send((step, e));
                    }
                }
                ev
            })
        });
        Evaluator { requests, results, thread }
    }

    /// Evaluates `params` (the parameters after `step` updates) when the thread is free.
    pub(super) fn request(&self, step: u64, params: &[f32]) {
        if self.thread.is_some() {
            let _ = self.requests.send((step, Arc::new(params.to_vec())));
        }
    }

    /// Hands the finished evaluations to the record.
    pub(super) fn drain_into(&self, rec: &mut Recorder) -> std::io::Result<()> {
        while let Ok((s, ev)) = self.results.try_recv() {
            rec.evaluation(s, ev)?;
        }
        Ok(())
    }

    /// The final evaluation of `params` after `step` updates, then every pending one into the
    /// record; returns the validation figures of `params` when `validate`.
    pub(super) fn finish(
        self,
        step: u64,
        params: &[f32],
        validate: bool,
        rec: &mut Recorder,
    ) -> std::io::Result<Option<Evaluation>> {
        self.request(step, params);
        let Evaluator { requests, results, thread } = self;
        drop(requests);
        let validation = match thread.map(|t| t.join()) {
            Some(Ok(mut ev)) if validate => ev.validate(params).ok(),
            _ => None,
        };
        while let Ok((s, ev)) = results.try_recv() {
            rec.evaluation(s, ev)?;
        }
        Ok(validation)
    }
}
