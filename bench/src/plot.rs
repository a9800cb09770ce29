//! PNG plots of a result file, drawn with plotters' bitmap backend. Text is
//! rendered with ab_glyph from a TrueType file (DejaVu Sans, Debian's
//! `fonts-dejavu-core`, or `TERN_BENCH_FONT`), so no fontconfig or freetype
//! is needed.

use std::collections::BTreeMap;
use std::path::Path;

use anyhow::{Context, anyhow};
use plotters::prelude::*;
use plotters::style::FontStyle;

use crate::flow::RateRun;
use crate::report::Results;

const FONT_PATHS: &[&str] = &[
    "/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf",
    "/usr/share/fonts/dejavu/DejaVuSans.ttf",
    "/usr/share/fonts/TTF/DejaVuSans.ttf",
];

/// Registers a font for "sans-serif" once; an error says where it looked.
pub fn load_font() -> anyhow::Result<()> {
    static DONE: std::sync::OnceLock<Result<(), String>> = std::sync::OnceLock::new();
    DONE.get_or_init(|| {
        let candidates: Vec<String> = std::env::var("TERN_BENCH_FONT")
            .into_iter()
            .chain(FONT_PATHS.iter().map(|s| s.to_string()))
            .collect();
        for path in &candidates {
            if let Ok(bytes) = std::fs::read(path) {
                // plotters keeps fonts for the life of the process.
                let bytes: &'static [u8] = Box::leak(bytes.into_boxed_slice());
                for style in [FontStyle::Normal, FontStyle::Bold] {
                    plotters::style::register_font("sans-serif", style, bytes)
                        .map_err(|_| format!("{path} is not a usable TrueType font"))?;
                }
                return Ok(());
            }
        }
        Err(format!(
            "no font found (install fonts-dejavu-core or set TERN_BENCH_FONT); looked in {candidates:?}"
        ))
    })
    .clone()
    .map_err(|e| anyhow!(e))
}

const COLORS: [RGBColor; 6] = [
    RGBColor(0x1f, 0x77, 0xb4),
    RGBColor(0xd6, 0x27, 0x28),
    RGBColor(0x2c, 0xa0, 0x2c),
    RGBColor(0xff, 0x7f, 0x0e),
    RGBColor(0x94, 0x67, 0xbd),
    RGBColor(0x8c, 0x56, 0x4b),
];

fn series_name(r: &RateRun) -> String {
    if r.system == "tern" { format!("tern {}", r.target) } else { r.system.clone() }
}

type Err = Box<dyn std::error::Error>;

/// S3: latency percentiles (p50 and p99, log scale) against the offered rate.
fn latency_vs_rate(runs: &[RateRun], path: &Path) -> Result<(), Err> {
    // One point per (system, rate): a measured point ("at 70%") replaces a
    // search step at the same rate, being the longer run.
    let mut by_rate: BTreeMap<String, BTreeMap<u64, (f64, f64, f64)>> = BTreeMap::new();
    for r in runs.iter().filter(|r| r.latency.count > 0) {
        by_rate
            .entry(series_name(r))
            .or_default()
            .insert(r.offered_rate.to_bits(), (r.offered_rate, r.latency.p50_ms, r.latency.p99_ms));
    }
    let mut series: BTreeMap<String, Vec<(f64, f64, f64)>> =
        by_rate.into_iter().map(|(k, v)| (k, v.into_values().collect())).collect();
    for pts in series.values_mut() {
        pts.sort_by(|a, b| a.0.total_cmp(&b.0));
    }
    let xmax = series.values().flatten().map(|p| p.0).fold(1.0, f64::max) * 1.1;
    let ymax = series.values().flatten().map(|p| p.2).fold(1.0, f64::max) * 2.0;
    let ymin = series.values().flatten().map(|p| p.1).fold(ymax, f64::min).max(0.001) / 2.0;
    let root = BitMapBackend::new(path, (1000, 620)).into_drawing_area();
    root.fill(&WHITE)?;
    let mut chart = ChartBuilder::on(&root)
        .caption("S3 1:1 — latency vs offered rate (solid p99, dashed p50)", ("sans-serif", 24))
        .margin(15)
        .x_label_area_size(45)
        .y_label_area_size(70)
        .build_cartesian_2d(0f64..xmax, (ymin..ymax).log_scale())?;
    chart
        .configure_mesh()
        .x_desc("offered messages / s")
        .y_desc("latency (ms, log)")
        .label_style(("sans-serif", 15))
        .draw()?;
    for (i, (name, pts)) in series.iter().enumerate() {
        let c = COLORS[i % COLORS.len()];
        chart
            .draw_series(LineSeries::new(pts.iter().map(|p| (p.0, p.2)), c.stroke_width(2)))?
            .label(name.clone())
            .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], c.stroke_width(2)));
        chart.draw_series(pts.iter().map(|p| Circle::new((p.0, p.2), 4, c.filled())))?;
        chart.draw_series(DashedLineSeries::new(pts.iter().map(|p| (p.0, p.1)), 6, 4, c.stroke_width(1)))?;
        chart.draw_series(pts.iter().map(|p| Circle::new((p.0, p.1), 3, c)))?;
    }
    chart
        .configure_series_labels()
        .background_style(WHITE.mix(0.9))
        .border_style(BLACK)
        .label_font(("sans-serif", 15))
        .draw()?;
    root.present()?;
    Ok(())
}

/// S4: best verified deliveries/s against group size, per system.
fn fanout(runs: &[RateRun], path: &Path) -> Result<(), Err> {
    let mut best: BTreeMap<String, BTreeMap<u32, f64>> = BTreeMap::new();
    for r in runs.iter().filter(|r| r.verdict.ok) {
        let e = best.entry(series_name(r)).or_default().entry(r.group_size).or_insert(0.0);
        *e = e.max(r.deliveries_per_s);
    }
    let ymax = best.values().flat_map(|m| m.values()).fold(1.0, |a: f64, b| a.max(*b)) * 1.2;
    let xmax = best.values().flat_map(|m| m.keys()).fold(10, |a: u32, b| a.max(*b)) as f64 * 1.5;
    let root = BitMapBackend::new(path, (1000, 620)).into_drawing_area();
    root.fill(&WHITE)?;
    let mut chart = ChartBuilder::on(&root)
        .caption("S4 group fan-out — deliveries/s vs group size (verified runs)", ("sans-serif", 24))
        .margin(15)
        .x_label_area_size(45)
        .y_label_area_size(90)
        .build_cartesian_2d((5f64..xmax).log_scale(), 0f64..ymax)?;
    chart
        .configure_mesh()
        .x_desc("members per group (log)")
        .y_desc("deliveries / s")
        .y_label_formatter(&|v| {
            if *v >= 1e6 { format!("{:.1}M", v / 1e6) } else { format!("{:.0}k", v / 1e3) }
        })
        .label_style(("sans-serif", 15))
        .draw()?;
    for (i, (name, pts)) in best.iter().enumerate() {
        let c = COLORS[i % COLORS.len()];
        let pts: Vec<(f64, f64)> = pts.iter().map(|(g, d)| (f64::from(*g), *d)).collect();
        chart
            .draw_series(LineSeries::new(pts.clone(), c.stroke_width(2)))?
            .label(name.clone())
            .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], c.stroke_width(2)));
        chart.draw_series(pts.iter().map(|p| Circle::new(*p, 5, c.filled())))?;
    }
    chart
        .configure_series_labels()
        .background_style(WHITE.mix(0.9))
        .border_style(BLACK)
        .label_font(("sans-serif", 15))
        .draw()?;
    root.present()?;
    Ok(())
}

/// tern against the peers: the highest sustainable 1:1 rate of each.
fn peers(results: &Results, path: &Path) -> Result<(), Err> {
    let bars: Vec<(String, f64)> = results
        .s3_max
        .iter()
        .map(|m| {
            let name = if m.system == "tern" { format!("tern {}", m.target) } else { m.system.clone() };
            // At the search ceiling the true maximum is higher.
            (if m.capped { format!("{name} ≥") } else { name }, m.max_rate)
        })
        .collect();
    let ymax = bars.iter().map(|b| b.1).fold(1.0, f64::max) * 1.25;
    let root = BitMapBackend::new(path, (1000, 620)).into_drawing_area();
    root.fill(&WHITE)?;
    let mut chart = ChartBuilder::on(&root)
        .caption("S3 1:1 — highest sustainable rate, tern vs peers", ("sans-serif", 24))
        .margin(15)
        .x_label_area_size(45)
        .y_label_area_size(90)
        .build_cartesian_2d(0f64..bars.len().max(1) as f64, 0f64..ymax)?;
    chart
        .configure_mesh()
        .disable_x_mesh()
        .x_labels(0)
        .y_desc("messages / s")
        .label_style(("sans-serif", 15))
        .draw()?;
    for (i, (name, v)) in bars.iter().enumerate() {
        let c = COLORS[i % COLORS.len()];
        let x = i as f64;
        chart.draw_series(std::iter::once(Rectangle::new([(x + 0.15, 0.0), (x + 0.85, *v)], c.filled())))?;
        chart.draw_series(std::iter::once(Text::new(
            format!("{name} {v:.0}/s"),
            (x + 0.17, v + ymax * 0.03),
            ("sans-serif", 16).into_font(),
        )))?;
    }
    root.present()?;
    Ok(())
}

/// Draws every plot the results have data for into `dir`; returns the file
/// names written.
pub fn draw_all(results: &Results, dir: &Path) -> anyhow::Result<Vec<String>> {
    load_font()?;
    std::fs::create_dir_all(dir)?;
    let mut written = Vec::new();
    let mut draw = |name: &str, f: &dyn Fn(&Path) -> Result<(), Err>| -> anyhow::Result<()> {
        f(&dir.join(name)).map_err(|e| anyhow!("{name}: {e}")).context("drawing a plot")?;
        written.push(name.to_owned());
        Ok(())
    };
    if results.s3.iter().any(|r| r.latency.count > 0) {
        draw("latency_vs_rate.png", &|p| latency_vs_rate(&results.s3, p))?;
    }
    if results.s4.iter().any(|r| r.verdict.ok) {
        draw("fanout.png", &|p| fanout(&results.s4, p))?;
    }
    if !results.s3_max.is_empty() {
        draw("peers_1to1.png", &|p| peers(results, p))?;
    }
    Ok(written)
}
