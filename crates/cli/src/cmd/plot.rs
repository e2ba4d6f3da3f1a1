//! `quorum plot`: charts (PNG and SVG) from the files runs already write, and from tables of
//! results over seeds.
//!
//! Run mode reads `metrics.csv`, `arrivals.csv` and `workers.csv` of each run directory (from
//! `quorum sim` or `quorum train`; both write the same columns, time in `virtual_seconds` or
//! `seconds`). Table mode reads any CSV with one row per run and draws the mean over the rows
//! that share (group, x) with min–max bars, and prints the same numbers as a Markdown table.

use anyhow::{bail, Context, Result};
use clap::Args;
use plotters::coord::types::RangedCoordf64;
use plotters::coord::Shift;
use plotters::prelude::*;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

/// Flags of `quorum plot`.
#[derive(Args, Debug)]
pub struct PlotArgs {
    /// Run directories to draw on the same charts.
    runs: Vec<PathBuf>,
    /// Legend names for the runs, in order (default: the directory names).
    #[arg(long = "label")]
    labels: Vec<String>,
    /// Output directory (run mode) or path prefix without extension (table mode).
    #[arg(long, default_value = "plots")]
    out: PathBuf,
    /// Table mode: a CSV with one row per run (e.g. one per seed).
    #[arg(long, conflicts_with = "runs")]
    table: Option<PathBuf>,
    /// Table mode: the column on the x axis (numeric).
    #[arg(long, requires = "table")]
    x: Option<String>,
    /// Table mode: the column on the y axis (numeric).
    #[arg(long, requires = "table")]
    y: Option<String>,
    /// Table mode: one line per value of this column.
    #[arg(long, requires = "table")]
    group: Option<String>,
    /// Chart title.
    #[arg(long)]
    title: Option<String>,
}

const SIZE: (u32, u32) = (900, 540);

/// Draws the same chart as PNG and SVG (a macro: the drawing code is generic over the
/// backend, and a closure cannot be).
macro_rules! both {
    ($dir:expr, $name:expr, |$area:ident| $draw:expr) => {{
        let png = $dir.join(format!("{}.png", $name));
        let svg = $dir.join(format!("{}.svg", $name));
        {
            let root = BitMapBackend::new(&png, SIZE).into_drawing_area();
            root.fill(&WHITE).map_err(plot_err)?;
            let $area = &root;
            $draw?;
            root.present().map_err(plot_err).with_context(|| format!("cannot write {}", png.display()))?;
        }
        {
            let root = SVGBackend::new(&svg, SIZE).into_drawing_area();
            root.fill(&WHITE).map_err(plot_err)?;
            let $area = &root;
            $draw?;
            root.present().map_err(plot_err).with_context(|| format!("cannot write {}", svg.display()))?;
        }
        Ok::<_, anyhow::Error>(vec![png, svg])
    }};
}

/// Runs `quorum plot`.
pub fn run(args: PlotArgs) -> Result<()> {
    // Text needs a font; the bundled one keeps charts identical on every machine.
    plotters::style::register_font("sans-serif", FontStyle::Normal, dejavu::sans::regular())
        .map_err(|_| anyhow::anyhow!("the bundled font could not be loaded"))?;
    if let Some(table) = &args.table {
        let (Some(x), Some(y)) = (&args.x, &args.y) else {
            bail!("--table needs --x COLUMN and --y COLUMN");
        };
        return plot_table(table, x, y, args.group.as_deref(), args.title.as_deref(), &args.out);
    }
    if args.runs.is_empty() {
        bail!("give one or more run directories (quorum plot runs/a runs/b), or --table FILE.csv --x COL --y COL");
    }
    let runs = args
        .runs
        .iter()
        .enumerate()
        .map(|(i, dir)| Run::load(dir, args.labels.get(i).cloned()))
        .collect::<Result<Vec<_>>>()?;
    std::fs::create_dir_all(&args.out).with_context(|| format!("cannot create {}", args.out.display()))?;
    let mut written = Vec::new();
    let title = |default: &str| args.title.clone().unwrap_or_else(|| default.to_string());
    let with_acc: Vec<&Run> = runs.iter().filter(|r| !r.accuracy.is_empty()).collect();
    if !with_acc.is_empty() {
        let time_label = if runs.iter().all(|r| r.virtual_time) { "virtual seconds" } else { "seconds" };
        let by_time: Vec<Line> = with_acc.iter().map(|r| Line::new(&r.label, r.accuracy_by(|p| p.seconds))).collect();
        written.extend(both!(&args.out, "accuracy_vs_time", |a| {
            lines(a, &title("Test accuracy over time"), time_label, "test accuracy", &by_time, None)
        })?);
        let by_ex: Vec<Line> =
            with_acc.iter().map(|r| Line::new(&r.label, r.accuracy_by(|p| p.examples as f64))).collect();
        written.extend(both!(&args.out, "accuracy_vs_examples", |a| {
            lines(a, &title("Test accuracy over training examples"), "examples", "test accuracy", &by_ex, None)
        })?);
    }
    let cdfs: Vec<Line> = runs.iter().flat_map(Run::arrival_cdfs).collect();
    if !cdfs.is_empty() {
        // Stop the axis where the slowest rank reaches 99.5% of steps: the rest is one line at 1.
        let x_max =
            cdfs.iter().filter_map(|l| l.points.iter().find(|p| p.1 >= 0.995).map(|p| p.0)).fold(0.0, f64::max) * 1.1;
        written.extend(both!(&args.out, "arrivals_cdf", |a| {
            lines(
                a,
                &title("Time to the k-th gradient of a step (CDF)"),
                "seconds since the step opened",
                "fraction of steps",
                &cdfs,
                Some(x_max),
            )
        })?);
    }
    let steps: Vec<(String, Vec<f64>)> =
        runs.iter().filter(|r| !r.step_seconds.is_empty()).map(|r| (r.label.clone(), r.step_seconds.clone())).collect();
    if !steps.is_empty() {
        written.extend(both!(&args.out, "step_times", |a| histogram(a, &title("Step times"), &steps))?);
    }
    let workers: Vec<(String, Vec<f64>)> =
        runs.iter().filter(|r| !r.compute.is_empty()).map(|r| (r.label.clone(), r.compute.clone())).collect();
    if !workers.is_empty() {
        written.extend(both!(&args.out, "workers", |a| bars(a, &title("Mean compute time per worker"), &workers))?);
    }
    if written.is_empty() {
        bail!("nothing to draw: the run directories hold no metrics.csv, arrivals.csv or workers.csv rows");
    }
    for p in written {
        println!("wrote {}", p.display());
    }
    Ok(())
}

fn plot_err<E: std::fmt::Display>(e: E) -> anyhow::Error {
    anyhow::anyhow!("drawing failed: {e}")
}

type Chart<'a, DB> = ChartContext<'a, DB, Cartesian2d<RangedCoordf64, RangedCoordf64>>;

/// A titled chart over `x` × `y`, every chart in the same style.
fn frame<'a, DB: DrawingBackend>(
    area: &'a DrawingArea<DB, Shift>,
    title: &str,
    x: std::ops::Range<f64>,
    y: std::ops::Range<f64>,
) -> Result<Chart<'a, DB>> {
    ChartBuilder::on(area)
        .caption(title, ("sans-serif", 24))
        .margin(12)
        .x_label_area_size(45)
        .y_label_area_size(80)
        .build_cartesian_2d(x, y)
        .map_err(plot_err)
}

/// The legend box.
fn legend<'a, DB: DrawingBackend + 'a>(chart: &mut Chart<'a, DB>, position: SeriesLabelPosition) -> Result<()> {
    chart
        .configure_series_labels()
        .position(position)
        .label_font(("sans-serif", 15))
        .background_style(WHITE.mix(0.85))
        .border_style(BLACK)
        .draw()
        .map_err(plot_err)
}

/// One named series of (x, y) points.
struct Line {
    label: String,
    points: Vec<(f64, f64)>,
}

impl Line {
    fn new(label: &str, points: Vec<(f64, f64)>) -> Self {
        Self { label: label.to_string(), points }
    }
}

/// The smallest range holding every value, padded so nothing sits on the frame.
fn span(values: impl Iterator<Item = f64>) -> (f64, f64) {
    let (lo, hi) =
        values.filter(|v| v.is_finite()).fold((f64::INFINITY, f64::NEG_INFINITY), |(a, b), v| (a.min(v), b.max(v)));
    if !lo.is_finite() {
        return (0.0, 1.0);
    }
    let pad = if hi > lo { (hi - lo) * 0.04 } else { lo.abs().max(1.0) * 0.1 };
    (lo - pad, hi + pad)
}

/// Line chart; with `x_max`, the x axis stops there (for long-tailed CDFs).
fn lines<DB: DrawingBackend>(
    area: &DrawingArea<DB, Shift>,
    title: &str,
    xl: &str,
    yl: &str,
    series: &[Line],
    x_max: Option<f64>,
) -> Result<()> {
    let (x0, mut x1) = span(series.iter().flat_map(|l| l.points.iter().map(|p| p.0)));
    if let Some(m) = x_max.filter(|m| *m > x0) {
        x1 = x1.min(m);
    }
    let (y0, y1) = span(series.iter().flat_map(|l| l.points.iter().map(|p| p.1)));
    let mut chart = frame(area, title, x0..x1, y0..y1)?;
    chart.configure_mesh().x_desc(xl).y_desc(yl).label_style(("sans-serif", 15)).draw().map_err(plot_err)?;
    for (i, l) in series.iter().enumerate() {
        let color = Palette99::pick(i).to_rgba();
        chart
            .draw_series(LineSeries::new(l.points.iter().copied(), color.stroke_width(2)))
            .map_err(plot_err)?
            .label(l.label.clone())
            .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], color.stroke_width(2)));
    }
    legend(&mut chart, SeriesLabelPosition::LowerRight)
}

/// Overlaid histograms (outlined, shared bins) of each run's values.
fn histogram<DB: DrawingBackend>(
    area: &DrawingArea<DB, Shift>,
    title: &str,
    runs: &[(String, Vec<f64>)],
) -> Result<()> {
    // The range ends at the largest 99th percentile, so one huge outlier cannot squash the
    // rest into one bin; values beyond land in the last bin.
    let hi = runs.iter().map(|(_, v)| quorum_sim::quantile(v, 0.99)).fold(0.0, f64::max) * 1.05;
    let bins = 40usize;
    let width = if hi > 0.0 { hi / bins as f64 } else { 1.0 };
    let mut series = Vec::new();
    let mut top = 0.0f64;
    for (label, values) in runs {
        let mut counts = vec![0usize; bins];
        for v in values {
            counts[((v / width) as usize).min(bins - 1)] += 1;
        }
        let n = values.len().max(1) as f64;
        let mut points = vec![(0.0, 0.0)];
        for (i, c) in counts.iter().enumerate() {
            let f = *c as f64 / n;
            top = top.max(f);
            points.push((i as f64 * width, f));
            points.push(((i + 1) as f64 * width, f));
        }
        points.push((bins as f64 * width, 0.0));
        series.push(Line::new(label, points));
    }
    let mut chart = frame(area, title, 0.0..bins as f64 * width, 0.0..top * 1.08 + 1e-9)?;
    chart
        .configure_mesh()
        .x_desc("seconds per step (the last bin holds everything beyond)")
        .y_desc("fraction of steps")
        .label_style(("sans-serif", 15))
        .draw()
        .map_err(plot_err)?;
    for (i, l) in series.iter().enumerate() {
        let color = Palette99::pick(i).to_rgba();
        chart
            .draw_series(
                AreaSeries::new(l.points.iter().copied(), 0.0, color.mix(0.15)).border_style(color.stroke_width(2)),
            )
            .map_err(plot_err)?
            .label(l.label.clone())
            .legend(move |(x, y)| Rectangle::new([(x, y - 5), (x + 20, y + 5)], color.filled()));
    }
    legend(&mut chart, SeriesLabelPosition::UpperRight)
}

/// Per-worker bars, one colour per run.
fn bars<DB: DrawingBackend>(area: &DrawingArea<DB, Shift>, title: &str, runs: &[(String, Vec<f64>)]) -> Result<()> {
    let workers = runs.iter().map(|(_, v)| v.len()).max().unwrap_or(0);
    let top = runs.iter().flat_map(|(_, v)| v.iter().copied()).filter(|v| v.is_finite()).fold(0.0, f64::max);
    let mut chart = frame(area, title, -0.5..workers as f64 - 0.5, 0.0..top * 1.1 + 1e-9)?;
    chart
        .configure_mesh()
        .x_desc("worker")
        .y_desc("mean compute seconds per gradient")
        .x_labels(workers.min(20))
        .x_label_formatter(&|x| format!("{}", x.round() as i64))
        .label_style(("sans-serif", 15))
        .draw()
        .map_err(plot_err)?;
    let slot = 0.8 / runs.len().max(1) as f64;
    for (r, (label, values)) in runs.iter().enumerate() {
        let color = Palette99::pick(r).to_rgba();
        let left = -0.4 + r as f64 * slot;
        chart
            .draw_series(
                values.iter().enumerate().filter(|(_, v)| v.is_finite()).map(|(w, v)| {
                    Rectangle::new([(w as f64 + left, 0.0), (w as f64 + left + slot, *v)], color.filled())
                }),
            )
            .map_err(plot_err)?
            .label(label.clone())
            .legend(move |(x, y)| Rectangle::new([(x, y - 5), (x + 20, y + 5)], color.filled()));
    }
    legend(&mut chart, SeriesLabelPosition::UpperRight)
}

/// One evaluation point of a run.
struct EvalPoint {
    seconds: f64,
    examples: u64,
    accuracy: f64,
}

/// What the charts need from one run directory.
struct Run {
    label: String,
    virtual_time: bool,
    accuracy: Vec<EvalPoint>,
    step_seconds: Vec<f64>,
    /// (step, k, seconds since the step opened) of every arrival.
    arrivals: Vec<(u64, u32, f64)>,
    compute: Vec<f64>,
}

/// Reads a CSV into rows keyed by column name; a missing file is an empty table.
fn read_rows(path: &Path) -> Result<Vec<BTreeMap<String, String>>> {
    if !path.exists() {
        return Ok(Vec::new());
    }
    let mut r = csv::Reader::from_path(path).with_context(|| format!("cannot read {}", path.display()))?;
    let headers = r.headers().with_context(|| format!("{} has no header row", path.display()))?.clone();
    let mut rows = Vec::new();
    for (i, rec) in r.records().enumerate() {
        let rec = rec.with_context(|| format!("{} row {} is malformed", path.display(), i + 2))?;
        rows.push(headers.iter().zip(rec.iter()).map(|(h, v)| (h.to_string(), v.to_string())).collect());
    }
    Ok(rows)
}

fn num(row: &BTreeMap<String, String>, key: &str) -> Option<f64> {
    row.get(key).and_then(|v| v.trim().parse::<f64>().ok()).filter(|v| v.is_finite())
}

impl Run {
    fn load(dir: &Path, label: Option<String>) -> Result<Self> {
        if !dir.is_dir() {
            bail!("{} is not a run directory (expected the --out of a quorum sim or train run)", dir.display());
        }
        let label = label.unwrap_or_else(|| dir.file_name().map_or("run".into(), |n| n.to_string_lossy().into_owned()));
        let metrics = read_rows(&dir.join("metrics.csv"))?;
        let virtual_time = metrics.first().is_some_and(|r| r.contains_key("virtual_seconds"));
        let time_key = if virtual_time { "virtual_seconds" } else { "seconds" };
        let mut accuracy = Vec::new();
        let mut step_seconds = Vec::new();
        let mut last: Option<f64> = None;
        for row in &metrics {
            let t = num(row, time_key);
            if let (Some(t), Some(prev)) = (t, last) {
                step_seconds.push(t - prev);
            }
            last = t.or(last);
            if let (Some(t), Some(a)) = (t, num(row, "test_accuracy")) {
                accuracy.push(EvalPoint {
                    seconds: t,
                    examples: num(row, "examples").unwrap_or(0.0) as u64,
                    accuracy: a,
                });
            }
        }
        let arrivals = read_rows(&dir.join("arrivals.csv"))?
            .iter()
            .filter_map(|r| Some((num(r, "step")? as u64, num(r, "k")? as u32, num(r, "seconds")?)))
            .collect();
        let compute = read_rows(&dir.join("workers.csv"))?
            .iter()
            .map(|r| num(r, "mean_compute_seconds").unwrap_or(f64::NAN))
            .collect();
        Ok(Self { label, virtual_time, accuracy, step_seconds, arrivals, compute })
    }

    fn accuracy_by(&self, x: impl Fn(&EvalPoint) -> f64) -> Vec<(f64, f64)> {
        self.accuracy.iter().map(|p| (x(p), p.accuracy)).collect()
    }

    /// Empirical CDFs of the k-th arrival time for the paper's ranks (1, 50%, 90%, and the
    /// last four), over the steps that saw every rank.
    fn arrival_cdfs(&self) -> Vec<Line> {
        let kmax = self.arrivals.iter().map(|a| a.1).max().unwrap_or(0);
        // Async steps take one gradient each: nothing to rank.
        if kmax < 2 {
            return Vec::new();
        }
        let mut ks: Vec<u32> = vec![1, kmax.div_ceil(2), (kmax * 9).div_ceil(10)];
        ks.extend((0..4).filter_map(|d| kmax.checked_sub(d)));
        ks.retain(|k| *k >= 1);
        ks.sort_unstable();
        ks.dedup();
        ks.iter()
            .map(|&k| {
                let mut t: Vec<f64> = self.arrivals.iter().filter(|a| a.1 == k).map(|a| a.2).collect();
                t.sort_by(f64::total_cmp);
                let n = t.len().max(1) as f64;
                let points = t.iter().enumerate().map(|(i, s)| (*s, (i + 1) as f64 / n)).collect();
                Line::new(&format!("{} k={k}", self.label), points)
            })
            .collect()
    }
}

/// Mean and min–max of y over rows sharing (group, x).
#[derive(Debug, Clone, PartialEq)]
pub struct Aggregate {
    /// The group's value ("" without --group).
    pub group: String,
    /// The x value.
    pub x: f64,
    /// Mean y.
    pub mean: f64,
    /// Smallest y.
    pub min: f64,
    /// Largest y.
    pub max: f64,
    /// Rows averaged.
    pub n: usize,
}

/// Groups the table's rows and averages the y column; rows with an empty y (e.g. a run that
/// never reached its target) are counted as missing, not as zero.
pub fn aggregate(rows: &[BTreeMap<String, String>], x: &str, y: &str, group: Option<&str>) -> Result<Vec<Aggregate>> {
    let mut cells: BTreeMap<(String, i64), (f64, Vec<f64>)> = BTreeMap::new();
    for (i, row) in rows.iter().enumerate() {
        let xv = num(row, x).with_context(|| format!("row {}: column `{x}` is missing or not a number", i + 2))?;
        let g = match group {
            Some(g) => row.get(g).cloned().with_context(|| format!("row {}: no column `{g}`", i + 2))?,
            None => String::new(),
        };
        if !row.contains_key(y) {
            bail!("no column `{y}` in the table (columns: {})", row.keys().cloned().collect::<Vec<_>>().join(", "));
        }
        let cell = cells.entry((g, (xv * 1e6).round() as i64)).or_insert((xv, Vec::new()));
        if let Some(v) = num(row, y) {
            cell.1.push(v);
        }
    }
    Ok(cells
        .into_iter()
        .map(|((group, _), (x, v))| {
            let n = v.len();
            let mean = if n == 0 { f64::NAN } else { v.iter().sum::<f64>() / n as f64 };
            let min = v.iter().copied().fold(f64::INFINITY, f64::min);
            let max = v.iter().copied().fold(f64::NEG_INFINITY, f64::max);
            Aggregate { group, x, mean, min, max, n }
        })
        .collect())
}

fn plot_table(path: &Path, x: &str, y: &str, group: Option<&str>, title: Option<&str>, out: &Path) -> Result<()> {
    let rows = read_rows(path)?;
    if rows.is_empty() {
        bail!("{} has no rows", path.display());
    }
    let agg = aggregate(&rows, x, y, group)?;
    println!("| {} | {x} | {y} (mean) | min | max | runs |", group.unwrap_or("series"));
    println!("|---|---:|---:|---:|---:|---:|");
    for a in &agg {
        if a.n == 0 {
            println!("| {} | {} | — | — | — | 0 |", a.group, a.x);
        } else {
            println!("| {} | {} | {:.4} | {:.4} | {:.4} | {} |", a.group, a.x, a.mean, a.min, a.max, a.n);
        }
    }
    if let Some(parent) = out.parent().filter(|p| !p.as_os_str().is_empty()) {
        std::fs::create_dir_all(parent).with_context(|| format!("cannot create {}", parent.display()))?;
    }
    let dir = out.parent().unwrap_or(Path::new(".")).to_path_buf();
    let name = out.file_name().map_or("table".into(), |n| n.to_string_lossy().into_owned());
    let title = title.map_or_else(|| format!("{y} by {x}"), str::to_string);
    let written = both!(&dir, &name, |area| table_chart(area, &title, x, y, &agg))?;
    for p in written {
        println!("wrote {}", p.display());
    }
    Ok(())
}

fn table_chart<DB: DrawingBackend>(
    area: &DrawingArea<DB, Shift>,
    title: &str,
    xl: &str,
    yl: &str,
    agg: &[Aggregate],
) -> Result<()> {
    let ok: Vec<&Aggregate> = agg.iter().filter(|a| a.n > 0).collect();
    let (x0, x1) = span(ok.iter().map(|a| a.x));
    let (y0, y1) = span(ok.iter().flat_map(|a| [a.min, a.max]));
    let mut chart = frame(area, title, x0..x1, y0..y1)?;
    chart.configure_mesh().x_desc(xl).y_desc(yl).label_style(("sans-serif", 15)).draw().map_err(plot_err)?;
    let mut groups: Vec<&str> = ok.iter().map(|a| a.group.as_str()).collect();
    groups.dedup();
    for (i, g) in groups.iter().enumerate() {
        let color = Palette99::pick(i).to_rgba();
        let pts: Vec<&&Aggregate> = ok.iter().filter(|a| a.group == *g).collect();
        let label = if g.is_empty() { "mean (bars: min–max)".to_string() } else { g.to_string() };
        chart
            .draw_series(LineSeries::new(pts.iter().map(|a| (a.x, a.mean)), color.stroke_width(2)))
            .map_err(plot_err)?
            .label(label)
            .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], color.stroke_width(2)));
        chart
            .draw_series(
                pts.iter().map(|a| ErrorBar::new_vertical(a.x, a.min, a.mean, a.max, color.stroke_width(2), 10)),
            )
            .map_err(plot_err)?;
    }
    legend(&mut chart, SeriesLabelPosition::UpperRight)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn row(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
        pairs.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect()
    }

    #[test]
    fn aggregate_averages_seeds_per_group_and_x_and_skips_missing_values() {
        let rows = vec![
            row(&[("policy", "sync"), ("n", "50"), ("t", "10")]),
            row(&[("policy", "sync"), ("n", "50"), ("t", "14")]),
            row(&[("policy", "sync"), ("n", "50"), ("t", "")]),
            row(&[("policy", "async"), ("n", "50"), ("t", "30")]),
        ];
        let a = aggregate(&rows, "n", "t", Some("policy")).unwrap();
        assert_eq!(a.len(), 2);
        let sync = a.iter().find(|a| a.group == "sync").unwrap();
        assert_eq!((sync.mean, sync.min, sync.max, sync.n), (12.0, 10.0, 14.0, 2));
        let asy = a.iter().find(|a| a.group == "async").unwrap();
        assert_eq!((asy.mean, asy.n), (30.0, 1));
    }

    #[test]
    fn aggregate_names_a_missing_column() {
        let rows = vec![row(&[("n", "1"), ("t", "2")])];
        let e = aggregate(&rows, "n", "acc", None).unwrap_err().to_string();
        assert!(e.contains("no column `acc`"), "{e}");
        let e = aggregate(&rows, "x", "t", None).unwrap_err().to_string();
        assert!(e.contains("column `x` is missing"), "{e}");
    }
}
