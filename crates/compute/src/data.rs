//! Dataset readers: MNIST and Fashion-MNIST in IDX format (raw or `.gz`), CIFAR-10 in its
//! binary format. Every reader checks magic numbers, counts and sizes and names the file
//! and the problem when something is off.

use crate::source::ComputeError;
use std::io::Read;
use std::path::{Path, PathBuf};
use std::str::FromStr;

/// Which dataset.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum DatasetName {
    /// MNIST digits, 28×28×1, 10 classes.
    Mnist,
    /// Fashion-MNIST, 28×28×1, 10 classes.
    FashionMnist,
    /// CIFAR-10, 32×32×3, 10 classes.
    Cifar10,
}

impl FromStr for DatasetName {
    type Err = quorum_core::ConfigError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "mnist" => Ok(DatasetName::Mnist),
            "fashion-mnist" | "fashion_mnist" => Ok(DatasetName::FashionMnist),
            "cifar10" | "cifar-10" => Ok(DatasetName::Cifar10),
            _ => Err(quorum_core::ConfigError::invalid(format!(
                "unknown dataset `{s}`: use mnist, fashion-mnist or cifar10"
            ))),
        }
    }
}

impl DatasetName {
    /// The directory name under the data root (`data/<name>`).
    pub fn dir_name(self) -> &'static str {
        match self {
            DatasetName::Mnist => "mnist",
            DatasetName::FashionMnist => "fashion-mnist",
            DatasetName::Cifar10 => "cifar10",
        }
    }

    /// Per-channel mean and standard deviation used to standardise pixels.
    fn normalisation(self) -> (&'static [f32], &'static [f32]) {
        match self {
            DatasetName::Mnist => (&[0.1307], &[0.3081]),
            DatasetName::FashionMnist => (&[0.2860], &[0.3530]),
            DatasetName::Cifar10 => (&[0.4914, 0.4822, 0.4465], &[0.2470, 0.2435, 0.2616]),
        }
    }
}

/// Images (standardised, channel-major) with their labels.
#[derive(Debug, Clone, PartialEq)]
pub struct Dataset {
    /// `len × channels × height × width` values.
    pub images: Vec<f32>,
    /// One label per image.
    pub labels: Vec<u8>,
    /// Channels per image.
    pub channels: usize,
    /// Image height.
    pub height: usize,
    /// Image width.
    pub width: usize,
    /// Number of classes.
    pub classes: usize,
}

impl Dataset {
    /// Number of examples.
    pub fn len(&self) -> usize {
        self.labels.len()
    }

    /// True when there are no examples.
    pub fn is_empty(&self) -> bool {
        self.labels.is_empty()
    }

    /// Values per image.
    pub fn image_len(&self) -> usize {
        self.channels * self.height * self.width
    }

    /// The pixels of image `i`.
    pub fn image(&self, i: usize) -> &[f32] {
        let n = self.image_len();
        &self.images[i * n..(i + 1) * n]
    }

    /// Splits off the last `n` examples as a held-out validation set.
    pub fn split_validation(mut self, n: usize) -> (Dataset, Dataset) {
        let n = n.min(self.len());
        let keep = self.len() - n;
        let val = Dataset {
            images: self.images.split_off(keep * self.image_len()),
            labels: self.labels.split_off(keep),
            channels: self.channels,
            height: self.height,
            width: self.width,
            classes: self.classes,
        };
        (self, val)
    }
}

fn data_err(path: &Path, msg: impl std::fmt::Display) -> ComputeError {
    ComputeError::Data(format!("{}: {msg}", path.display()))
}

/// Reads a file, transparently gunzipping `NAME.gz` when `NAME` is absent.
fn read_maybe_gz(dir: &Path, name: &str) -> Result<(PathBuf, Vec<u8>), ComputeError> {
    let raw = dir.join(name);
    if raw.exists() {
        let bytes = std::fs::read(&raw).map_err(|e| data_err(&raw, e))?;
        return Ok((raw, bytes));
    }
    let gz = dir.join(format!("{name}.gz"));
    if gz.exists() {
        let file = std::fs::File::open(&gz).map_err(|e| data_err(&gz, e))?;
        let mut bytes = Vec::new();
        flate2::read::GzDecoder::new(file)
            .read_to_end(&mut bytes)
            .map_err(|e| data_err(&gz, format!("not a valid gzip file ({e})")))?;
        return Ok((gz, bytes));
    }
    Err(ComputeError::Data(format!(
        "dataset file {} (or {}.gz) not found; run `scripts/fetch-data.sh` to install MNIST and Fashion-MNIST, or point --data at the directory that holds it",
        raw.display(),
        raw.display()
    )))
}

fn be_u32(b: &[u8], at: usize) -> u32 {
    u32::from_be_bytes([b[at], b[at + 1], b[at + 2], b[at + 3]])
}

/// Parses an IDX file of unsigned bytes with `dims` dimensions; returns (dims, payload).
pub fn parse_idx(path: &Path, bytes: &[u8], dims: usize) -> Result<(Vec<usize>, Vec<u8>), ComputeError> {
    let header = 4 + 4 * dims;
    if bytes.len() < header {
        return Err(data_err(path, format!("too short for an IDX header ({} bytes)", bytes.len())));
    }
    let magic = be_u32(bytes, 0);
    let expected = 0x0800 + dims as u32;
    if magic != expected {
        return Err(data_err(
            path,
            format!(
                "bad IDX magic number 0x{magic:08x}, expected 0x{expected:08x} (unsigned bytes, {dims} dimensions)"
            ),
        ));
    }
    let shape: Vec<usize> = (0..dims).map(|i| be_u32(bytes, 4 + 4 * i) as usize).collect();
    let count: usize = shape.iter().product();
    if bytes.len() != header + count {
        return Err(data_err(
            path,
            format!(
                "header says {shape:?} ({count} values) but the file holds {} values; the file is truncated or corrupt",
                bytes.len() - header
            ),
        ));
    }
    Ok((shape, bytes[header..].to_vec()))
}

fn load_idx_pair(dir: &Path, images: &str, labels: &str, name: DatasetName) -> Result<Dataset, ComputeError> {
    let (ipath, ibytes) = read_maybe_gz(dir, images)?;
    let (lpath, lbytes) = read_maybe_gz(dir, labels)?;
    let (ishape, pixels) = parse_idx(&ipath, &ibytes, 3)?;
    let (lshape, labels) = parse_idx(&lpath, &lbytes, 1)?;
    if ishape[0] != lshape[0] {
        return Err(data_err(&ipath, format!("{} images but {} has {} labels", ishape[0], lpath.display(), lshape[0])));
    }
    if let Some(bad) = labels.iter().find(|&&l| l >= 10) {
        return Err(data_err(&lpath, format!("label {bad} is out of range 0..10")));
    }
    let (mean, std) = name.normalisation();
    let images = pixels.iter().map(|&p| (p as f32 / 255.0 - mean[0]) / std[0]).collect();
    Ok(Dataset { images, labels, channels: 1, height: ishape[1], width: ishape[2], classes: 10 })
}

/// Parses CIFAR-10 binary records (1 label byte + 3072 pixel bytes, R then G then B planes).
pub fn parse_cifar10(path: &Path, bytes: &[u8]) -> Result<Dataset, ComputeError> {
    const REC: usize = 1 + 3 * 32 * 32;
    if bytes.is_empty() || !bytes.len().is_multiple_of(REC) {
        return Err(data_err(path, format!("size {} is not a positive multiple of the 3073-byte CIFAR-10 record; the file is truncated or not CIFAR-10 binary", bytes.len())));
    }
    let (mean, std) = DatasetName::Cifar10.normalisation();
    let n = bytes.len() / REC;
    let mut images = Vec::with_capacity(n * 3072);
    let mut labels = Vec::with_capacity(n);
    for (i, rec) in bytes.chunks_exact(REC).enumerate() {
        if rec[0] >= 10 {
            return Err(data_err(path, format!("record {i} has label {}, outside 0..10", rec[0])));
        }
        labels.push(rec[0]);
        for (c, plane) in rec[1..].chunks_exact(1024).enumerate() {
            images.extend(plane.iter().map(|&p| (p as f32 / 255.0 - mean[c]) / std[c]));
        }
    }
    Ok(Dataset { images, labels, channels: 3, height: 32, width: 32, classes: 10 })
}

fn load_cifar(dir: &Path, files: &[&str]) -> Result<Dataset, ComputeError> {
    let mut all: Option<Dataset> = None;
    for f in files {
        let (path, bytes) = read_maybe_gz(dir, f)?;
        let d = parse_cifar10(&path, &bytes)?;
        match &mut all {
            None => all = Some(d),
            Some(a) => {
                a.images.extend(d.images);
                a.labels.extend(d.labels);
            }
        }
    }
    Ok(all.expect("at least one file"))
}

/// Loads (train, test) of `name` from `dir` (e.g. `data/mnist`).
pub fn load(name: DatasetName, dir: &Path) -> Result<(Dataset, Dataset), ComputeError> {
    if !dir.is_dir() {
        return Err(ComputeError::Data(format!(
            "dataset directory {} does not exist; run `scripts/fetch-data.sh` (MNIST, Fashion-MNIST) or pass --data DIR",
            dir.display()
        )));
    }
    match name {
        DatasetName::Mnist | DatasetName::FashionMnist => Ok((
            load_idx_pair(dir, "train-images-idx3-ubyte", "train-labels-idx1-ubyte", name)?,
            load_idx_pair(dir, "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte", name)?,
        )),
        DatasetName::Cifar10 => Ok((
            load_cifar(
                dir,
                &["data_batch_1.bin", "data_batch_2.bin", "data_batch_3.bin", "data_batch_4.bin", "data_batch_5.bin"],
            )?,
            load_cifar(dir, &["test_batch.bin"])?,
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    /// A temporary directory, removed when the test ends.
    fn tmpdir(tag: &str) -> tempfile::TempDir {
        tempfile::Builder::new().prefix(&format!("quorum-data-{tag}-")).tempdir().unwrap()
    }

    fn idx(magic: u32, dims: &[u32], payload: &[u8]) -> Vec<u8> {
        let mut v = magic.to_be_bytes().to_vec();
        for d in dims {
            v.extend(d.to_be_bytes());
        }
        v.extend(payload);
        v
    }

    fn write_mnist(dir: &Path, n: u32, gz: bool) {
        let imgs = idx(0x803, &[n, 28, 28], &vec![255u8; (n * 784) as usize]);
        let labs = idx(0x801, &[n], &(0..n).map(|i| (i % 10) as u8).collect::<Vec<_>>());
        for (name, bytes) in [
            ("train-images-idx3-ubyte", &imgs),
            ("train-labels-idx1-ubyte", &labs),
            ("t10k-images-idx3-ubyte", &imgs),
            ("t10k-labels-idx1-ubyte", &labs),
        ] {
            if gz {
                let f = std::fs::File::create(dir.join(format!("{name}.gz"))).unwrap();
                let mut e = flate2::write::GzEncoder::new(f, flate2::Compression::fast());
                e.write_all(bytes).unwrap();
                e.finish().unwrap();
            } else {
                std::fs::write(dir.join(name), bytes).unwrap();
            }
        }
    }

    #[test]
    fn reads_generated_idx_files_raw_and_gzipped() {
        for gz in [false, true] {
            let dir = tmpdir(if gz { "gz" } else { "raw" });
            write_mnist(dir.path(), 12, gz);
            let (train, test) = load(DatasetName::Mnist, dir.path()).unwrap();
            assert_eq!((train.len(), test.len(), train.image_len()), (12, 12, 784));
            assert_eq!(train.labels[..3], [0, 1, 2]);
            assert!((train.images[0] - (1.0 - 0.1307) / 0.3081).abs() < 1e-5);
            let (tr, val) = train.split_validation(2);
            assert_eq!((tr.len(), val.len(), val.labels.clone()), (10, 2, vec![0, 1]));
        }
    }

    #[test]
    fn corrupt_idx_files_are_named_with_the_problem() {
        let p = Path::new("x-idx3-ubyte");
        let e = parse_idx(p, &idx(0x801, &[2, 28, 28], &[]), 3).unwrap_err().to_string();
        assert!(e.contains("x-idx3-ubyte") && e.contains("bad IDX magic"), "{e}");
        let e = parse_idx(p, &idx(0x803, &[2, 28, 28], &[0; 100]), 3).unwrap_err().to_string();
        assert!(e.contains("truncated"), "{e}");
        let e = parse_idx(p, &[0, 0], 3).unwrap_err().to_string();
        assert!(e.contains("too short"), "{e}");
    }

    #[test]
    fn missing_dataset_says_how_to_get_it() {
        let e = load(DatasetName::Mnist, Path::new("/nonexistent/mnist")).unwrap_err().to_string();
        assert!(e.contains("fetch-data.sh") && e.contains("/nonexistent/mnist"), "{e}");
        let dir = tmpdir("empty");
        let e = load(DatasetName::FashionMnist, dir.path()).unwrap_err().to_string();
        assert!(e.contains("train-images-idx3-ubyte") && e.contains("not found"), "{e}");
    }

    #[test]
    fn reads_cifar10_records_and_rejects_bad_sizes_and_labels() {
        let mut rec = vec![3u8];
        rec.extend(std::iter::repeat_n(0u8, 1024));
        rec.extend(std::iter::repeat_n(255u8, 1024));
        rec.extend(std::iter::repeat_n(128u8, 1024));
        let two = [rec.clone(), rec.clone()].concat();
        let d = parse_cifar10(Path::new("b.bin"), &two).unwrap();
        assert_eq!((d.len(), d.labels[1], d.image_len()), (2, 3, 3072));
        assert!((d.image(0)[1024] - (1.0 - 0.4822) / 0.2435).abs() < 1e-5, "green plane second");
        let e = parse_cifar10(Path::new("b.bin"), &two[..5000]).unwrap_err().to_string();
        assert!(e.contains("3073-byte"), "{e}");
        let mut bad = rec.clone();
        bad[0] = 12;
        assert!(parse_cifar10(Path::new("b.bin"), &bad).unwrap_err().to_string().contains("label 12"));
    }

    #[test]
    fn real_mnist_files_load_when_present() {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../data/mnist");
        if !dir.exists() {
            tracing::warn!("skipping: {} not installed (scripts/fetch-data.sh)", dir.display());
            return;
        }
        let (train, test) = load(DatasetName::Mnist, &dir).unwrap();
        assert_eq!((train.len(), test.len()), (60_000, 10_000));
        let mut counts = [0usize; 10];
        test.labels.iter().for_each(|&l| counts[l as usize] += 1);
        assert_eq!(counts, [980, 1135, 1032, 1010, 982, 892, 958, 1028, 974, 1009]);
    }
}
