//! The built-in models as functions of a flat parameter buffer.
//!
//! Each model declares its tensors in a fixed order (the [`ParamLayout`]); both engines (the
//! native passes and burn's autodiff) read the flat buffer in exactly the layout's order:
//!
//! - MLP: `layer{i}.weight` `[in, out]`, `layer{i}.bias` `[out]`, for each layer in order.
//! - CNNs: `conv{i}.weight` `[out, in, 3, 3]`, `conv{i}.bias` `[out]`, then `fc.weight`
//!   `[features, classes]`, `fc.bias` `[classes]`.

use quorum_core::ParamLayout;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use serde::{Deserialize, Serialize};

/// A model architecture.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case", tag = "kind", deny_unknown_fields)]
pub enum ModelSpec {
    /// Fully connected ReLU network; `hidden` are the hidden layer widths.
    Mlp {
        /// Hidden layer widths (default 512, 512).
        hidden: Vec<usize>,
    },
    /// The paper's MNIST CNN: four 3×3 convolutions (two blocks of two, each followed by
    /// 2×2 max-pooling) and a linear classifier. Weight normalisation is not used (see README).
    Cnn {
        /// Channels of the four convolutions.
        channels: [usize; 4],
    },
}

impl Default for ModelSpec {
    fn default() -> Self {
        ModelSpec::Mlp { hidden: vec![512, 512] }
    }
}

impl ModelSpec {
    /// Parses `mlp`, `mlp:256,256`, `cnn` or `cnn:16,16,32,32`.
    pub fn parse(s: &str) -> Result<Self, quorum_core::ConfigError> {
        Self::parse_text(s).map_err(quorum_core::ConfigError::invalid)
    }

    fn parse_text(s: &str) -> Result<Self, String> {
        let (kind, args) = s.split_once(':').unwrap_or((s, ""));
        let nums = || -> Result<Vec<usize>, String> {
            args.split(',')
                .map(|x| x.trim().parse::<usize>().map_err(|_| format!("`{x}` in model `{s}` is not a whole number")))
                .collect()
        };
        match kind {
            "mlp" if args.is_empty() => Ok(ModelSpec::default()),
            "mlp" => Ok(ModelSpec::Mlp { hidden: nums()? }),
            "cnn" if args.is_empty() => Ok(ModelSpec::Cnn { channels: [32, 32, 64, 64] }),
            "cnn" => {
                let v = nums()?;
                let channels: [usize; 4] =
                    v.try_into().map_err(|_| format!("model `{s}`: cnn takes exactly four channel counts"))?;
                Ok(ModelSpec::Cnn { channels })
            }
            _ => Err(format!("unknown model `{s}`: use mlp, mlp:W1,W2,..., cnn or cnn:C1,C2,C3,C4")),
        }
    }

    /// The layout for inputs of `(channels, height, width)` and `classes` outputs.
    pub fn layout(&self, input: (usize, usize, usize), classes: usize) -> ParamLayout {
        let mut l = ParamLayout::new();
        let mut add = |name: String, shape: Vec<usize>| l.push(name, shape).expect("unique names");
        match self {
            ModelSpec::Mlp { hidden } => {
                let mut prev = input.0 * input.1 * input.2;
                for (i, &h) in hidden.iter().chain(std::iter::once(&classes)).enumerate() {
                    add(format!("layer{i}.weight"), vec![prev, h]);
                    add(format!("layer{i}.bias"), vec![h]);
                    prev = h;
                }
            }
            ModelSpec::Cnn { channels } => {
                let mut prev = input.0;
                for (i, &c) in channels.iter().enumerate() {
                    add(format!("conv{i}.weight"), vec![c, prev, 3, 3]);
                    add(format!("conv{i}.bias"), vec![c]);
                    prev = c;
                }
                let features = channels[3] * (input.1 / 4) * (input.2 / 4);
                add("fc.weight".into(), vec![features, classes]);
                add("fc.bias".into(), vec![classes]);
            }
        }
        l
    }

    /// He-uniform weights and zero biases, a pure function of `seed`.
    pub fn init(&self, layout: &ParamLayout, seed: u64) -> Vec<f32> {
        let mut rng = ChaCha8Rng::seed_from_u64(seed);
        let mut flat = vec![0.0f32; layout.len()];
        for t in layout.tensors() {
            if t.name.ends_with(".bias") {
                continue;
            }
            let fan_in: usize = match self {
                ModelSpec::Mlp { .. } => t.shape[0],
                ModelSpec::Cnn { .. } if t.name == "fc.weight" => t.shape[0],
                ModelSpec::Cnn { .. } => t.shape[1..].iter().product(),
            };
            let bound = (6.0 / fan_in as f32).sqrt();
            for v in &mut flat[t.range()] {
                *v = rng.random_range(-bound..bound);
            }
        }
        flat
    }
}
