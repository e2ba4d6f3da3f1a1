//! A [`GradientSource`] for image classification: a [`ModelSpec`] on a [`Dataset`], with
//! deterministic batches; gradients by the native engine (hand-written passes on `gemm`) or,
//! in builds with the `burn` feature, by burn's autodiff ([`Engine`]).

use crate::batch::BatchPlan;
#[cfg(feature = "burn")]
use crate::burn_engine::BurnEngine;
use crate::data::Dataset;
use crate::model::ModelSpec;
use crate::native::{Engine, Labelled, Native};
use crate::source::{check_len, BatchId, ComputeError, Evaluation, GradientSource};
use quorum_core::ParamLayout;
use std::sync::Arc;

/// Who computes, with its state.
#[derive(Clone)]
enum Compute {
    Native(Native),
    #[cfg(feature = "burn")]
    Burn(Engine, Box<BurnEngine>),
}

/// A classifier trained on `train`, evaluated on `test` and `validation`. Clones share the
/// datasets (one copy in memory for all of a process's workers) and have their own scratch
/// buffers.
#[derive(Clone)]
pub struct Classifier {
    spec: ModelSpec,
    layout: ParamLayout,
    train: Arc<Dataset>,
    validation: Arc<Dataset>,
    test: Arc<Dataset>,
    plan: BatchPlan,
    batch: usize,
    idx: Vec<usize>,
    x: Vec<f32>,
    labels: Vec<u8>,
    compute: Compute,
}

impl Classifier {
    /// A classifier; `workers` and `seed` fix the batch plan (see [`BatchPlan`]).
    pub fn new(
        spec: ModelSpec,
        train: Dataset,
        validation: Dataset,
        test: Dataset,
        batch: usize,
        workers: u32,
        seed: u64,
    ) -> Result<Self, ComputeError> {
        if train.is_empty() {
            return Err(ComputeError::Config("the training set is empty".into()));
        }
        if batch == 0 {
            return Err(ComputeError::Config("batch size must be at least 1".into()));
        }
        if let ModelSpec::Cnn { .. } = spec {
            if !train.height.is_multiple_of(4) || !train.width.is_multiple_of(4) {
                return Err(ComputeError::Config(format!(
                    "the CNN needs image sides divisible by 4, got {}×{}",
                    train.height, train.width
                )));
            }
        }
        let layout = spec.layout((train.channels, train.height, train.width), train.classes);
        let plan = BatchPlan::new(train.len(), batch, workers, seed);
        Ok(Classifier {
            compute: Compute::Native(Native::new(&spec)),
            spec,
            layout,
            plan,
            batch,
            idx: Vec::new(),
            x: Vec::new(),
            labels: Vec::new(),
            train: Arc::new(train),
            validation: Arc::new(validation),
            test: Arc::new(test),
        })
    }

    /// The same classifier with its gradients computed by `engine`; an engine this build
    /// does not have (burn's need the `burn` or `wgpu` feature) is an error that says how to
    /// get it.
    pub fn with_engine(mut self, engine: Engine) -> Result<Self, ComputeError> {
        engine.check_built()?;
        self.compute = match engine {
            #[cfg(feature = "burn")]
            Engine::Burn | Engine::Wgpu => Compute::Burn(engine, Box::new(BurnEngine::new(engine)?)),
            _ => Compute::Native(Native::new(&self.spec)),
        };
        Ok(self)
    }

    /// Who computes the gradients.
    pub fn engine(&self) -> Engine {
        match &self.compute {
            Compute::Native(_) => Engine::Native,
            #[cfg(feature = "burn")]
            Compute::Burn(engine, _) => *engine,
        }
    }

    /// The model.
    pub fn spec(&self) -> &ModelSpec {
        &self.spec
    }

    /// The training set.
    pub fn train_set(&self) -> &Dataset {
        &self.train
    }

    /// Mini-batches per epoch over the training set (counting all workers' batches).
    pub fn batches_per_epoch(&self) -> u64 {
        self.plan.batches_per_epoch()
    }

    /// Loads `params` into burn tensors and reads them back into a flat buffer: the same
    /// work as moving parameters in and gradients out of the model (tests and benchmarks).
    #[cfg(feature = "burn")]
    pub fn roundtrip(&self, params: &[f32], out: &mut Vec<f32>) {
        BurnEngine::new(Engine::Burn).expect("burn on the CPU").roundtrip(&self.layout, params, out)
    }

    /// Mean loss and accuracy on `data`, by the native forward pass or burn's.
    fn evaluate_on(&mut self, params: &[f32], data: &Dataset) -> Result<Evaluation, ComputeError> {
        check_len(params, &self.layout)?;
        if data.is_empty() {
            return Ok(Evaluation { loss: f32::NAN, accuracy: None });
        }
        let (c, h, w, k) = (data.channels, data.height, data.width, data.classes);
        let mut tally = Tally::default();
        match &mut self.compute {
            Compute::Native(native) => {
                let chunk = native.eval_chunk();
                for start in (0..data.len()).step_by(chunk) {
                    let n = chunk.min(data.len() - start);
                    let x = &data.images[start * c * h * w..(start + n) * c * h * w];
                    let logits = native.logits(&self.layout, params, x, (c, h, w), n);
                    tally.add(logits, &data.labels[start..start + n], k);
                }
            }
            #[cfg(feature = "burn")]
            Compute::Burn(_, burn) => {
                burn.logits(&self.spec, &self.layout, params, data, |logits, labels| tally.add(logits, labels, k))?
            }
        }
        Ok(tally.finish())
    }
}

/// Running cross-entropy and correct answers over rows of logits.
#[derive(Default)]
struct Tally {
    loss_sum: f64,
    correct: usize,
    seen: usize,
}

impl Tally {
    fn add(&mut self, logits: &[f32], labels: &[u8], classes: usize) {
        for (row, &label) in logits.chunks_exact(classes).zip(labels) {
            let label = label as usize;
            let max = row.iter().cloned().fold(f32::NEG_INFINITY, f32::max);
            let lse = max + row.iter().map(|v| (v - max).exp()).sum::<f32>().ln();
            self.loss_sum += (lse - row[label]) as f64;
            let arg = row.iter().enumerate().max_by(|a, b| a.1.total_cmp(b.1)).map(|(j, _)| j).unwrap_or(0);
            self.correct += (arg == label) as usize;
            self.seen += 1;
        }
    }

    fn finish(&self) -> Evaluation {
        Evaluation {
            loss: (self.loss_sum / self.seen as f64) as f32,
            accuracy: Some(self.correct as f32 / self.seen as f32),
        }
    }
}

impl GradientSource for Classifier {
    fn layout(&self) -> &ParamLayout {
        &self.layout
    }

    fn train_examples(&self) -> Option<usize> {
        Some(self.train_set().len())
    }

    fn init_params(&self, seed: u64) -> Vec<f32> {
        self.spec.init(&self.layout, seed)
    }

    fn batch_size(&self) -> usize {
        self.batch
    }

    fn gradient(&mut self, params: &[f32], batch: BatchId, grad: &mut Vec<f32>) -> Result<f32, ComputeError> {
        match &mut self.compute {
            Compute::Native(_) => {
                // Every value is overwritten: no need to zero a buffer of the right size.
                if grad.len() != self.layout.len() {
                    grad.clear();
                    grad.resize(self.layout.len(), 0.0);
                }
                self.gradient_into(params, batch, grad)
            }
            #[cfg(feature = "burn")]
            Compute::Burn(_, burn) => {
                check_len(params, &self.layout)?;
                self.plan.indices(batch.worker, batch.step, &mut self.idx);
                burn.gradient(&self.spec, &self.layout, params, &self.train, &self.idx, grad)
            }
        }
    }

    fn gradient_into(&mut self, params: &[f32], batch: BatchId, out: &mut [f32]) -> Result<f32, ComputeError> {
        self.gradient_into_unless(params, batch, out, &|| false)
    }

    fn gradient_into_unless(
        &mut self,
        params: &[f32],
        batch: BatchId,
        out: &mut [f32],
        overtaken: &dyn Fn() -> bool,
    ) -> Result<f32, ComputeError> {
        #[cfg(feature = "burn")]
        if let Compute::Burn(..) = self.compute {
            // burn's engines hand back a buffer (copied), and run to the end.
            return crate::source::gradient_via_buffer(self, params, batch, out);
        }
        check_len(params, &self.layout)?;
        if out.len() != self.layout.len() {
            return Err(ComputeError::WrongGradientLength { got: out.len(), expected: self.layout.len() });
        }
        self.plan.indices(batch.worker, batch.step, &mut self.idx);
        let d = &self.train;
        self.x.clear();
        self.labels.clear();
        for &i in &self.idx {
            self.x.extend_from_slice(d.image(i));
            self.labels.push(d.labels[i]);
        }
        let examples = Labelled { x: &self.x, image: (d.channels, d.height, d.width), labels: &self.labels };
        match &mut self.compute {
            Compute::Native(native) => {
                native.loss_and_gradient(&self.layout, params, examples, out, overtaken).ok_or(ComputeError::Abandoned)
            }
            #[cfg(feature = "burn")]
            Compute::Burn(..) => unreachable!("burn's engines are handled above"),
        }
    }

    fn can_abandon(&self) -> bool {
        matches!(self.compute, Compute::Native(_))
    }

    fn evaluate(&mut self, params: &[f32]) -> Result<Evaluation, ComputeError> {
        let data = Arc::clone(&self.test);
        self.evaluate_on(params, &data)
    }

    fn validate(&mut self, params: &[f32]) -> Result<Evaluation, ComputeError> {
        let data = Arc::clone(&self.validation);
        self.evaluate_on(params, &data)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use quorum_core::WorkerId;

    /// A tiny generated dataset: `n` images of `c×s×s` with a learnable pattern.
    fn tiny(n: usize, c: usize, s: usize, seed: u64) -> Dataset {
        use rand::{Rng, SeedableRng};
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed);
        let labels: Vec<u8> = (0..n).map(|i| (i % 3) as u8).collect();
        let mut images: Vec<f32> = (0..n * c * s * s).map(|_| rng.random_range(-1.0f32..1.0)).collect();
        // The first pixel carries the label, so there is something to learn.
        for (i, l) in labels.iter().enumerate() {
            images[i * c * s * s] = *l as f32;
        }
        Dataset { images, labels, channels: c, height: s, width: s, classes: 3 }
    }

    fn finite_difference_check(spec: ModelSpec, data: Dataset, engine: Engine) {
        let mut clf =
            Classifier::new(spec, data.clone(), data.clone(), data, 4, 1, 0).unwrap().with_engine(engine).unwrap();
        let params = clf.init_params(1);
        let layout = clf.layout().clone();
        let b = BatchId { worker: WorkerId(0), step: 0 };
        let mut g = Vec::new();
        clf.gradient(&params, b, &mut g).unwrap();
        assert_eq!(g.len(), params.len());
        // Check a spread of coordinates from every tensor against central differences. ReLU and
        // max-pooling have kinks: where the finite difference itself changes with h (a kink lies
        // within h), the coordinate is skipped; most coordinates must be smooth and must match.
        let mut fd = |i: usize, h: f32| {
            let mut p = params.clone();
            p[i] += h;
            let up = clf.gradient(&p, b, &mut Vec::new()).unwrap();
            p[i] -= 2.0 * h;
            let down = clf.gradient(&p, b, &mut Vec::new()).unwrap();
            (up - down) / (2.0 * h)
        };
        let (mut checked, mut kinks) = (0, 0);
        for t in layout.tensors() {
            for i in t.range().step_by((t.len() / 3).max(1)) {
                let (a, c) = (fd(i, 1e-2), fd(i, 3e-3));
                if (a - c).abs() > 1e-3 + 1e-2 * a.abs() {
                    kinks += 1;
                    continue;
                }
                assert!(
                    (a - g[i]).abs() < 1e-3 + 2e-2 * g[i].abs(),
                    "{} [{i}]: finite difference {a} vs gradient {}",
                    t.name,
                    g[i]
                );
                checked += 1;
            }
        }
        assert!(checked >= 8 && kinks * 3 <= checked, "{checked} coordinates checked, {kinks} skipped at kinks");
    }

    /// The engines this build has.
    fn engines() -> Vec<Engine> {
        let mut all = vec![Engine::Native];
        if cfg!(feature = "burn") {
            all.push(Engine::Burn);
        }
        all
    }

    #[test]
    fn mlp_gradient_matches_finite_differences() {
        for engine in engines() {
            finite_difference_check(ModelSpec::Mlp { hidden: vec![5] }, tiny(8, 1, 3, 1), engine);
        }
    }

    #[test]
    fn cnn_gradient_matches_finite_differences() {
        for engine in engines() {
            finite_difference_check(ModelSpec::Cnn { channels: [2, 2, 3, 3] }, tiny(8, 1, 4, 2), engine);
        }
    }

    /// The native engine and burn's autodiff (on `other`'s device) give the same loss and
    /// gradient, value by value, on several batches (three-channel images too, and a batch
    /// that does not divide the data).
    #[cfg(feature = "burn")]
    fn engines_agree_on(other: Engine, spec: ModelSpec, data: Dataset, batch: usize) {
        let mk = |e| {
            Classifier::new(spec.clone(), data.clone(), data.clone(), data.clone(), batch, 2, 3)
                .unwrap()
                .with_engine(e)
                .unwrap()
        };
        let (mut native, mut burn) = (mk(Engine::Native), mk(other));
        assert_eq!((native.engine(), burn.engine()), (Engine::Native, other));
        let params = native.init_params(7);
        let (mut a, mut b) = (Vec::new(), Vec::new());
        for step in 0..3 {
            let id = BatchId { worker: WorkerId(1), step };
            let (la, lb) = (native.gradient(&params, id, &mut a).unwrap(), burn.gradient(&params, id, &mut b).unwrap());
            assert!((la - lb).abs() <= 1e-5 * (1.0 + lb.abs()), "loss {la} vs {lb}");
            let scale = b.iter().fold(0.0f32, |m, v| m.max(v.abs()));
            for t in native.layout().tensors() {
                for i in t.range() {
                    assert!((a[i] - b[i]).abs() <= 1e-4 * scale, "{} [{i}]: native {} vs burn {}", t.name, a[i], b[i]);
                }
            }
        }
    }

    #[test]
    #[cfg(feature = "burn")]
    fn both_engines_evaluate_to_the_same_loss_and_accuracy() {
        for (spec, data) in [
            (ModelSpec::Mlp { hidden: vec![16, 8] }, tiny(70, 1, 5, 10)),
            (ModelSpec::Cnn { channels: [3, 4, 5, 6] }, tiny(70, 1, 8, 11)),
        ] {
            let mk = |e| {
                Classifier::new(spec.clone(), data.clone(), data.clone(), data.clone(), 8, 1, 0)
                    .unwrap()
                    .with_engine(e)
                    .unwrap()
            };
            let (mut native, mut burn) = (mk(Engine::Native), mk(Engine::Burn));
            let params = native.init_params(4);
            let (a, b) = (native.evaluate(&params).unwrap(), burn.evaluate(&params).unwrap());
            assert!((a.loss - b.loss).abs() <= 1e-5 * (1.0 + b.loss.abs()), "loss {} vs {}", a.loss, b.loss);
            assert_eq!(a.accuracy, b.accuracy);
            assert_eq!(native.validate(&params).unwrap().accuracy, burn.validate(&params).unwrap().accuracy);
        }
    }

    #[cfg(feature = "burn")]
    fn engines_agree(spec: ModelSpec, data: Dataset, batch: usize) {
        engines_agree_on(Engine::Burn, spec, data, batch)
    }

    /// Needs a GPU (or a software Vulkan such as Mesa's llvmpipe): `experiments/gpu.sh` runs it.
    #[test]
    #[cfg(feature = "wgpu")]
    fn the_gradient_on_a_gpu_is_the_native_gradient() {
        engines_agree_on(Engine::Wgpu, ModelSpec::Mlp { hidden: vec![16, 8] }, tiny(40, 1, 5, 6), 12);
        engines_agree_on(Engine::Wgpu, ModelSpec::Cnn { channels: [3, 4, 5, 6] }, tiny(24, 1, 8, 8), 6);
    }

    #[test]
    #[cfg(feature = "burn")]
    fn the_native_mlp_gradient_is_burns_gradient() {
        engines_agree(ModelSpec::Mlp { hidden: vec![16, 8] }, tiny(40, 1, 5, 6), 12);
        engines_agree(ModelSpec::Mlp { hidden: vec![7] }, tiny(20, 3, 2, 7), 5);
    }

    #[test]
    #[cfg(feature = "burn")]
    fn the_native_cnn_gradient_is_burns_gradient() {
        engines_agree(ModelSpec::Cnn { channels: [3, 4, 5, 6] }, tiny(24, 1, 8, 8), 6);
        engines_agree(ModelSpec::Cnn { channels: [2, 3, 3, 2] }, tiny(12, 3, 4, 9), 5);
        // Layers 2 to 4 by Winograd (eight input channels and more, even sides).
        engines_agree(ModelSpec::Cnn { channels: [8, 8, 16, 16] }, tiny(24, 1, 8, 8), 6);
    }

    #[test]
    #[cfg(feature = "burn")]
    fn flat_buffer_round_trips_through_burn_tensors_in_layout_order() {
        let d = tiny(8, 1, 4, 3);
        let clf = Classifier::new(ModelSpec::Cnn { channels: [2, 2, 3, 3] }, d.clone(), d.clone(), d, 4, 1, 0).unwrap();
        let params: Vec<f32> = (0..clf.layout().len()).map(|i| i as f32 * 0.001).collect();
        let mut out = Vec::new();
        clf.roundtrip(&params, &mut out);
        assert_eq!(out, params);
        let names: Vec<&str> = clf.layout().tensors().iter().map(|t| t.name.as_str()).collect();
        assert_eq!(names[..3], ["conv0.weight", "conv0.bias", "conv1.weight"]);
        assert_eq!(clf.layout().get("fc.weight").unwrap().shape, vec![3, 3]);
    }

    #[test]
    fn an_engine_this_build_lacks_is_an_error_that_names_the_feature_to_build_with() {
        let d = tiny(8, 1, 3, 4);
        let clf = Classifier::new(ModelSpec::Mlp { hidden: vec![4] }, d.clone(), d.clone(), d, 4, 1, 0).unwrap();
        let lacking: &[Engine] = match (cfg!(feature = "burn"), cfg!(feature = "wgpu")) {
            (false, _) => &[Engine::Burn, Engine::Wgpu],
            (true, false) => &[Engine::Wgpu],
            (true, true) => &[],
        };
        for &engine in lacking {
            let e = clf.clone().with_engine(engine).err().expect("an engine not built in is refused");
            let want = format!("--features {}", engine.name());
            assert!(e.to_string().contains(&want), "{engine:?}: {e}");
        }
        assert_eq!(clf.with_engine(Engine::Native).unwrap().engine(), Engine::Native);
    }

    #[test]
    fn wrong_length_parameters_are_an_error_not_a_panic() {
        let d = tiny(8, 1, 3, 4);
        let mut clf = Classifier::new(ModelSpec::Mlp { hidden: vec![4] }, d.clone(), d.clone(), d, 4, 1, 0).unwrap();
        let e = clf.gradient(&[0.0; 3], BatchId { worker: WorkerId(0), step: 0 }, &mut Vec::new()).unwrap_err();
        assert!(e.to_string().contains("3 values"), "{e}");
    }

    #[test]
    fn a_gradient_written_in_place_is_the_gradient_and_a_slice_of_the_wrong_length_is_refused() {
        let d = tiny(16, 1, 4, 6);
        for spec in [ModelSpec::Mlp { hidden: vec![5] }, ModelSpec::Cnn { channels: [2, 2, 3, 3] }] {
            let mut clf = Classifier::new(spec, d.clone(), d.clone(), d.clone(), 4, 1, 0).unwrap();
            let params = clf.init_params(2);
            let b = BatchId { worker: WorkerId(1), step: 3 };
            let mut g = Vec::new();
            let loss = clf.gradient(&params, b, &mut g).unwrap();
            // Stale values in the slot (as in a reused shared-memory slot) are all overwritten.
            let mut slot = vec![f32::NAN; g.len()];
            let loss_in_place = clf.gradient_into(&params, b, &mut slot).unwrap();
            assert_eq!(loss.to_bits(), loss_in_place.to_bits());
            assert!(g.iter().zip(&slot).all(|(a, b)| a.to_bits() == b.to_bits()), "the same bits");
            let e = clf.gradient_into(&params, b, &mut vec![0.0; g.len() - 1]).unwrap_err();
            assert!(matches!(e, ComputeError::WrongGradientLength { .. }), "{e}");
        }
    }

    #[test]
    fn a_computation_stops_within_a_layer_once_overtaken_and_is_the_gradient_when_not() {
        let d = tiny(16, 1, 4, 6);
        // Asked after every product's block of columns (the MLP: 2 forward, 3 backward) or
        // after every run of a convolution's passes (the CNN, one run a pass here: 4 forward,
        // 4 for the kernels' gradients, 3 for the inputs' gradients).
        for (spec, questions) in
            [(ModelSpec::Mlp { hidden: vec![5] }, 5), (ModelSpec::Cnn { channels: [2, 2, 3, 3] }, 11)]
        {
            let mut clf = Classifier::new(spec.clone(), d.clone(), d.clone(), d.clone(), 4, 1, 0).unwrap();
            assert!(clf.can_abandon());
            let params = clf.init_params(2);
            let b = BatchId { worker: WorkerId(1), step: 3 };
            let mut g = Vec::new();
            let loss = clf.gradient(&params, b, &mut g).unwrap();
            let asks = std::cell::Cell::new(0);
            let mut slot = vec![f32::NAN; g.len()];
            let never = || {
                asks.set(asks.get() + 1);
                false
            };
            let kept = clf.gradient_into_unless(&params, b, &mut slot, &never).unwrap();
            assert_eq!(loss.to_bits(), kept.to_bits(), "{spec:?}");
            assert!(g.iter().zip(&slot).all(|(a, b)| a.to_bits() == b.to_bits()), "{spec:?}: the same bits");
            assert_eq!(asks.replace(0), questions, "{spec:?}");
            // Overtaken at the second question: it stops there, asking no more.
            let at_second = || {
                asks.set(asks.get() + 1);
                asks.get() >= 2
            };
            let e = clf.gradient_into_unless(&params, b, &mut slot, &at_second).unwrap_err();
            assert!(matches!(e, ComputeError::Abandoned), "{spec:?}: {e}");
            assert_eq!(asks.get(), 2, "{spec:?}");
            // The engine is whole after stopping half-way: the next gradient is the same.
            assert_eq!(clf.gradient_into_unless(&params, b, &mut slot, &|| false).unwrap().to_bits(), loss.to_bits());
            assert!(g.iter().zip(&slot).all(|(a, b)| a.to_bits() == b.to_bits()), "{spec:?}: after a stop");
        }
    }

    #[test]
    fn a_few_sgd_steps_reduce_the_training_loss() {
        let d = tiny(64, 1, 3, 5);
        let mut clf = Classifier::new(ModelSpec::Mlp { hidden: vec![16] }, d.clone(), d.clone(), d, 64, 1, 0).unwrap();
        let mut p = clf.init_params(0);
        let before = clf.evaluate(&p).unwrap().loss;
        let mut g = Vec::new();
        for step in 0..50 {
            clf.gradient(&p, BatchId { worker: WorkerId(0), step }, &mut g).unwrap();
            p.iter_mut().zip(&g).for_each(|(p, g)| *p -= 0.5 * g);
        }
        let after = clf.evaluate(&p).unwrap();
        assert!(after.loss < 0.7 * before, "loss {before} -> {}", after.loss);
    }
}
