//! Random restarts (`restarts = K`), one loop for `quorum sim` and `quorum train`: K attempts
//! from the random weights of seeds seed, seed + 1, ...; a diverged attempt stops early; the
//! attempt with the best validation figure is kept (test figures never choose).

use anyhow::{bail, Context, Result};
use quorum_record::Restart;
use std::path::Path;

/// Runs `k` attempts, `attempt(a, seed + a)` each, writes `restarts.csv` into `dir` (when
/// given) and returns the kept attempt's outcome and number.
pub(crate) fn best_of<T>(
    k: u32,
    seed: u64,
    dir: Option<&Path>,
    mut attempt: impl FnMut(u32, u64) -> Result<(Restart, T)>,
) -> Result<(T, u32)> {
    let mut rows = Vec::new();
    let mut best: Option<(f32, u32, T)> = None;
    for a in 0..k {
        let (row, outcome) = attempt(a, seed + u64::from(a))?;
        println!("attempt {a} (seed {}): {}", row.seed, row.describe());
        if let Some(score) = row.score() {
            if best.as_ref().is_none_or(|(b, _, _)| score > *b) {
                best = Some((score, a, outcome));
            }
        }
        rows.push(row);
    }
    for r in &mut rows {
        r.chosen = best.as_ref().is_some_and(|(_, a, _)| *a == r.attempt);
    }
    let mut see = String::new();
    if let Some(dir) = dir {
        std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
        let path = dir.join("restarts.csv");
        quorum_record::restarts::write(&path, &rows)?;
        see = format!(" (see {})", path.display());
    }
    let Some((_, a, outcome)) = best else {
        bail!("all {k} attempts diverged{see}: lower lr, add warmup, or clip the gradient (clip = 5)");
    };
    println!("kept attempt {a} (seed {}): best validation{see}", seed + u64::from(a));
    Ok((outcome, a))
}
