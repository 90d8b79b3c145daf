//! `sepconv analyze`: is a conv weight spatially separable, depthwise separable, and how far
//! from it is it?

use std::path::{Path, PathBuf};

use sepconv::decompose::Weight;
use sepconv::decompose::depthwise::{self, DepthwiseAnalysis, DepthwisePoint};
use sepconv::decompose::spatial::{SpatialAnalysis, SpatialPoint};
use sepconv::io::npy::read_npy;
use sepconv::io::safetensors::read_safetensors;
use sepconv::{Error, Exec, Result, Tensor};
use serde::Serialize;

use crate::cost::thousands;
use crate::plot::{Panel, Series, svg};

/// Is a conv weight spatially or depthwise separable, and how far from it is it?
///
/// For a weight [N, M, kh, kw]: spatial separability of each 2-D kernel and of the layer as
/// kh×1 then 1×kw; depthwise separability (per input channel, the N kernels are multiples of K
/// kernels); singular values, numerical ranks, the error of the best approximation at each size,
/// what it costs, and a plain-words verdict.
#[derive(clap::Args)]
#[command(after_help = "Examples:\n  sepconv analyze --weight w.npy\n  \
    sepconv analyze --weight runs/compare/mnist-ref-std/checkpoint.safetensors --layer block3 --plot block3.svg")]
pub struct Args {
    /// A weight .npy [N, M, kh, kw] or a checkpoint .safetensors.
    #[arg(long, value_name = "FILE")]
    weight: PathBuf,
    /// In a checkpoint: the layer (e.g. block2) or tensor (block2.weight) to analyze [default: every 4-D weight].
    #[arg(long, value_name = "NAME")]
    layer: Option<String>,
    /// Write an SVG chart of relative error against MACs per output pixel for both factorizations.
    #[arg(long, value_name = "FILE.svg")]
    plot: Option<PathBuf>,
    /// Also write the analysis as JSON.
    #[arg(long, value_name = "FILE")]
    json: Option<PathBuf>,
}

/// Reads the weights to analyze: one .npy, or tensors of a checkpoint.
pub fn load_weights(path: &Path, layer: Option<&str>) -> Result<Vec<(String, Tensor)>> {
    let is_safetensors = path.extension().is_some_and(|e| e == "safetensors");
    if !is_safetensors {
        if layer.is_some() {
            return Err(Error::invalid(format!(
                "--layer needs a checkpoint (.safetensors), {} is a single array",
                path.display()
            )));
        }
        let t = read_npy(path)?;
        return Ok(vec![(path.display().to_string(), t)]);
    }
    let file = read_safetensors(path)?;
    let mut names: Vec<&String> = file
        .tensors
        .iter()
        .filter(|(n, t)| {
            t.shape().len() == 4 && n.ends_with("weight") && !n.starts_with("optimizer.")
        })
        .map(|(n, _)| n)
        .collect();
    names.sort();
    match layer {
        Some(l) => {
            let key = if file.tensors.contains_key(l) {
                l.to_string()
            } else {
                format!("{l}.weight")
            };
            match file.tensors.get(&key) {
                Some(t) => Ok(vec![(key, t.clone())]),
                None => Err(Error::file(
                    path,
                    format!(
                        "no layer '{l}'; conv weights here: {}",
                        names
                            .iter()
                            .map(|n| n.trim_end_matches(".weight"))
                            .collect::<Vec<_>>()
                            .join(", ")
                    ),
                )),
            }
        }
        None if names.is_empty() => Err(Error::file(path, "holds no 4-D conv weight")),
        None => Ok(names
            .into_iter()
            .map(|n| (n.clone(), file.tensors[n].clone()))
            .collect()),
    }
}

#[derive(Serialize)]
struct Report {
    name: String,
    shape: [usize; 4],
    standard_macs_per_pixel: u64,
    rank_tolerance: String,
    spatial: SpatialReport,
    depthwise: DepthwiseReport,
    verdict: Vec<String>,
}

#[derive(Serialize)]
struct SpatialReport {
    kernels: usize,
    rank1_kernels: usize,
    kernel_singular_values_first: Vec<f64>,
    layer_singular_values: Vec<f64>,
    layer_rank: usize,
    curve: Vec<SpatialPoint>,
}

#[derive(Serialize)]
struct DepthwiseReport {
    channel_ranks: Vec<usize>,
    exact_multiplier: usize,
    break_even_multiplier: usize,
    curve: Vec<DepthwisePoint>,
}

pub fn run(_exec: Exec, a: Args) -> Result<()> {
    let weights = load_weights(&a.weight, a.layer.as_deref())?;
    let mut reports = Vec::new();
    let mut panels = Vec::new();
    for (name, t) in &weights {
        let w = Weight::from_tensor(t).map_err(|e| e.in_file(&a.weight))?;
        let (report, panel) = analyze(name, &w)?;
        print_report(&report, &w);
        reports.push(report);
        panels.push(panel);
    }
    if let Some(p) = &a.plot {
        sepconv::io::write_atomic(p, svg(&panels, 620, 440)?.as_bytes())?;
        println!("wrote {}", p.display());
    }
    if let Some(p) = &a.json {
        let text =
            serde_json::to_string_pretty(&reports).map_err(|e| Error::Runtime(e.to_string()))?;
        sepconv::io::write_atomic(p, text.as_bytes())?;
    }
    Ok(())
}

fn analyze(name: &str, w: &Weight) -> Result<(Report, Panel)> {
    let sp = SpatialAnalysis::of(w)?;
    let dw = DepthwiseAnalysis::of(w)?;
    let std = w.standard_macs_per_pixel();
    let (sc, dc) = (sp.curve(w), dw.curve(w));
    let exact_k = dw.exact_multiplier();
    let be = depthwise::break_even(w);
    let mut verdict = Vec::new();
    let e1 = dw.errors[0];
    if exact_k <= 1 {
        verdict.push(format!(
            "exactly depthwise separable with multiplier 1: for every input channel the {} kernels are multiples of one {}×{} kernel ({} MACs per output pixel instead of {}, {:.1}%)",
            w.n, w.kh, w.kw, thousands(dc[0].macs_per_pixel), thousands(std), 100.0 * dc[0].macs_per_pixel as f64 / std as f64
        ));
    } else if exact_k < be {
        verdict.push(format!(
            "exactly depthwise separable with multiplier {exact_k} ({} MACs per output pixel, {:.1}% of the standard layer); with K = 1 the relative error is {e1:.3}",
            thousands(depthwise::macs_per_pixel(w, exact_k)),
            100.0 * depthwise::macs_per_pixel(w, exact_k) as f64 / std as f64
        ));
    } else {
        verdict.push(format!(
            "not depthwise separable: the best 1-term approximation keeps {:.0}% of the kernel's energy (relative error {e1:.2}); exact only with K = {exact_k}, at or beyond the break-even K = {be} where it costs as much as the standard layer",
            100.0 * (1.0 - e1 * e1)
        ));
    }
    let layer_rank = sp.layer.rank();
    let kernels = w.n * w.m;
    if sp.separable_kernels() == kernels {
        verdict.push(format!(
            "every 2-D kernel is spatially separable (rank 1: a {}×1 column times a 1×{} row); as a layer, kh×1 then 1×kw is exact with R = {layer_rank} middle channels ({} MACs per output pixel, {:.1}%)",
            w.kh, w.kw, thousands(sc[layer_rank.max(1) - 1].macs_per_pixel),
            100.0 * sc[layer_rank.max(1) - 1].macs_per_pixel as f64 / std as f64
        ));
    } else {
        verdict.push(format!(
            "{} of {kernels} 2-D kernels are spatially separable (rank 1); the layer factorization kh×1 → 1×kw needs R = {layer_rank} for an exact result ({:.1}% of the standard MACs); with R = 1 the relative error is {:.2}",
            sp.separable_kernels(),
            100.0 * sc[layer_rank.max(1) - 1].macs_per_pixel as f64 / std as f64,
            sp.errors[0]
        ));
    }
    let panel = Panel {
        title: format!("{name}: error vs cost"),
        x_label: "MACs per output pixel (log)".into(),
        y_label: "relative Frobenius error".into(),
        series: vec![
            Series {
                name: "depthwise separable (K)".into(),
                points: dc
                    .iter()
                    .map(|p| (p.macs_per_pixel as f64, p.relative_error))
                    .collect(),
            },
            Series {
                name: "spatially separable (R)".into(),
                points: sc
                    .iter()
                    .map(|p| (p.macs_per_pixel as f64, p.relative_error))
                    .collect(),
            },
            Series {
                name: "standard".into(),
                points: vec![(std as f64, 0.0)],
            },
        ],
        lines: true,
        log_x: true,
        integer_x: false,
        legend_upper: true,
    };
    let report = Report {
        name: name.to_string(),
        shape: [w.n, w.m, w.kh, w.kw],
        standard_macs_per_pixel: std,
        rank_tolerance: "singular values above sigma_max * max(rows, cols) * eps(f32) (for depthwise: sigma_max of the whole layer)".into(),
        spatial: SpatialReport {
            kernels,
            rank1_kernels: sp.separable_kernels(),
            kernel_singular_values_first: sp.kernel_singular_values.first().cloned().unwrap_or_default(),
            layer_singular_values: sp.layer.s.clone(),
            layer_rank,
            curve: sc,
        },
        depthwise: DepthwiseReport { channel_ranks: dw.ranks.clone(), exact_multiplier: exact_k, break_even_multiplier: be, curve: dc },
        verdict,
    };
    Ok((report, panel))
}

/// The rows of a curve worth printing: the first few, powers of two, and the last.
fn pick_rows(len: usize) -> Vec<usize> {
    let mut rows: Vec<usize> = (1..=len.min(4)).collect();
    let mut p = 8;
    while p < len {
        rows.push(p);
        p *= 2;
    }
    if len > 4 {
        rows.push(len);
    }
    rows.dedup();
    rows
}

fn fmt_sv(s: &[f64]) -> String {
    let shown: Vec<String> = s.iter().take(9).map(|v| format!("{v:.4}")).collect();
    let more = if s.len() > 9 {
        format!(" … ({} in all)", s.len())
    } else {
        String::new()
    };
    format!("[{}]{more}", shown.join(", "))
}

/// One error-vs-MACs table: (rank, relative error, energy kept, MACs per pixel) per row, the
/// rows [`pick_rows`] selects, MACs also as a share of the standard layer's `std`.
fn print_curve(rank: &str, curve: &[(usize, f64, f64, u64)], std: u64) {
    println!(
        "  {:>5} {:>12} {:>12} {:>14} {:>9}",
        rank, "rel. error", "energy kept", "MACs/pixel", "vs std"
    );
    for i in pick_rows(curve.len()) {
        let (k, error, kept, macs) = curve[i - 1];
        println!(
            "  {:>5} {:>12.4} {:>11.1}% {:>14} {:>8.1}%",
            k,
            error,
            100.0 * kept,
            thousands(macs),
            100.0 * macs as f64 / std as f64
        );
    }
}

fn print_report(r: &Report, w: &Weight) {
    let std = r.standard_macs_per_pixel;
    println!(
        "{}: weight [{}, {}, {}, {}] (N = {} out, M = {} in, {}×{} kernels); standard conv: {} MACs per output pixel",
        r.name,
        w.n,
        w.m,
        w.kh,
        w.kw,
        w.n,
        w.m,
        w.kh,
        w.kw,
        thousands(std)
    );
    println!(
        "Rank tolerance: σ > σ_max · max(rows, cols) · ε(f32) ({:.2e}).",
        f32::EPSILON
    );
    println!("Spatial separability:");
    println!(
        "  2-D kernels of rank 1 (column × row): {} of {}; singular values of W[0, 0]: {}",
        r.spatial.rank1_kernels,
        r.spatial.kernels,
        fmt_sv(&r.spatial.kernel_singular_values_first)
    );
    println!(
        "  layer as {}×1 conv M→R then 1×{} conv R→N: the ({}·{}) × ({}·{}) matrix has rank {}; singular values {}",
        w.kh,
        w.kw,
        w.m,
        w.kh,
        w.n,
        w.kw,
        r.spatial.layer_rank,
        fmt_sv(&r.spatial.layer_singular_values)
    );
    let spatial: Vec<_> = (r.spatial.curve.iter())
        .map(|p| (p.r, p.relative_error, p.energy_kept, p.macs_per_pixel))
        .collect();
    print_curve("R", &spatial, std);
    let ranks = &r.depthwise.channel_ranks;
    println!(
        "Depthwise separability (per input channel m, the {} × {} matrix W[:, m]):",
        w.n,
        w.kh * w.kw
    );
    println!(
        "  channel ranks: min {}, max {} → exact with multiplier K = {}; break-even K = {} (from there on the separable form costs at least the standard layer)",
        ranks.iter().min().copied().unwrap_or(0),
        ranks.iter().max().copied().unwrap_or(0),
        r.depthwise.exact_multiplier,
        r.depthwise.break_even_multiplier
    );
    let depthwise: Vec<_> = (r.depthwise.curve.iter())
        .map(|p| (p.k, p.relative_error, p.energy_kept, p.macs_per_pixel))
        .collect();
    print_curve("K", &depthwise, std);
    println!("Verdict:");
    for v in &r.verdict {
        println!("  - {v}");
    }
    println!();
}
