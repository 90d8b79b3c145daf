//! `sepconv bench`: the reference layer set A–E, every variant and pass, side by side.

use std::collections::HashMap;
use std::path::PathBuf;
use std::time::Duration;

use sepconv::bench::{
    Pass, ReferenceLayer, VARIANTS, Variant, Workload, fma_peak_gmacs, time_runs,
};
use sepconv::{Error, Exec, Result};
use serde::Serialize;

/// Time the reference layer set of DESIGN.md (f32, NCHW, 3×3, 'same' except layer A):
/// variants std (M→N), dw (depthwise on M), pw (1×1 M→N), ds (dw then pw) and sp (3×1 M→R then
/// 1×3 R→N, R = min(M, N)); passes forward and train (forward + grad-input + grad-weight).
///
/// Reports the median and minimum of the timed runs, GMAC/s (nominal MACs / minimum time; a
/// training step counts 3 × the forward MACs), the share of this machine's FMA peak (measured
/// first), and for ds and sp the realized speedup over std next to the MAC ratio.
#[derive(clap::Args)]
pub struct Args {
    /// Layers to run (comma-separated subset of A,B,C,D,E).
    #[arg(long, default_value = "A,B,C,D,E", value_delimiter = ',')]
    layers: Vec<String>,
    /// Variants to run (subset of std,dw,pw,ds,sp); std always runs when ds or sp do, for the speedup.
    #[arg(long, default_value = "std,dw,pw,ds,sp", value_delimiter = ',')]
    variants: Vec<Variant>,
    /// Passes (forward, train).
    #[arg(long, default_value = "forward,train", value_delimiter = ',')]
    passes: Vec<Pass>,
    /// Untimed runs before timing.
    #[arg(long, default_value_t = 3)]
    warmup: usize,
    /// Minimum timed runs (more for fast cases, up to 200, to get about 0.25 s of samples).
    #[arg(long, default_value_t = 10)]
    reps: usize,
    /// Skip the FMA peak measurement.
    #[arg(long)]
    no_peak: bool,
    /// Also write the results as a JSON list of objects.
    #[arg(long, value_name = "FILE")]
    json: Option<PathBuf>,
}

#[derive(Serialize)]
struct Row {
    layer: String,
    variant: Variant,
    pass: Pass,
    /// Nominal MACs of the pass (a training step: forward + grad-input + grad-weight).
    macs: u64,
    forward_macs: u64,
    median_ms: f64,
    min_ms: f64,
    reps: usize,
    gmacs_per_s: f64,
    peak_fraction: Option<f64>,
    speedup_vs_std: Option<f64>,
    mac_ratio_vs_std: Option<f64>,
    threads: usize,
    isa: String,
}

pub fn run(exec: Exec, a: Args) -> Result<()> {
    let layers: Vec<ReferenceLayer> = a
        .layers
        .iter()
        .map(|l| ReferenceLayer::by_id(l))
        .collect::<Result<_>>()?;
    if a.reps == 0 {
        return Err(Error::invalid("--reps must be at least 1"));
    }
    let mut variants: Vec<Variant> = VARIANTS
        .iter()
        .copied()
        .filter(|v| a.variants.contains(v))
        .collect();
    if variants
        .iter()
        .any(|v| matches!(v, Variant::Ds | Variant::Sp))
        && !variants.contains(&Variant::Std)
    {
        variants.insert(0, Variant::Std);
    }
    let peak = if a.no_peak {
        None
    } else {
        let p = fma_peak_gmacs(exec);
        println!(
            "FMA peak ({} thread(s), {}): {p:.1} GMAC/s",
            exec.threads(),
            exec.isa()
        );
        Some(p)
    };
    println!(
        "{:<5} {:<4} {:<8} {:>14} {:>10} {:>10} {:>8} {:>6} {:>8} {:>9}",
        "layer",
        "var",
        "pass",
        "MACs",
        "median ms",
        "min ms",
        "GMAC/s",
        "%peak",
        "speedup",
        "MAC ratio"
    );
    let mut rows: Vec<Row> = Vec::new();
    let mut std_times: HashMap<(char, Pass), (f64, u64)> = HashMap::new();
    for layer in &layers {
        for &variant in &variants {
            let mut w = Workload::new(layer, variant)?;
            let fwd_macs = w.cost().forward_macs_nominal;
            for &pass in &a.passes {
                let t = time_runs(a.warmup, a.reps, Duration::from_millis(250), || {
                    w.run(exec, pass)
                })?;
                let macs = if pass == Pass::Train {
                    w.cost().train_macs_nominal()
                } else {
                    fwd_macs
                };
                let gmacs = macs as f64 / (t.min_ms * 1e-3) / 1e9;
                if variant == Variant::Std {
                    std_times.insert((layer.id, pass), (t.min_ms, fwd_macs));
                }
                let vs_std = matches!(variant, Variant::Ds | Variant::Sp)
                    .then(|| std_times.get(&(layer.id, pass)))
                    .flatten();
                let row = Row {
                    layer: layer.id.to_string(),
                    variant,
                    pass,
                    macs,
                    forward_macs: fwd_macs,
                    median_ms: t.median_ms,
                    min_ms: t.min_ms,
                    reps: t.reps,
                    gmacs_per_s: gmacs,
                    peak_fraction: peak.map(|p| gmacs / p),
                    speedup_vs_std: vs_std.map(|&(ms, _)| ms / t.min_ms),
                    mac_ratio_vs_std: vs_std.map(|&(_, m)| m as f64 / fwd_macs as f64),
                    threads: exec.threads(),
                    isa: exec.isa().to_string(),
                };
                println!(
                    "{:<5} {:<4} {:<8} {:>14} {:>10.3} {:>10.3} {:>8.1} {:>6} {:>8} {:>9}",
                    row.layer,
                    variant.to_string(),
                    pass.to_string(),
                    macs,
                    t.median_ms,
                    t.min_ms,
                    gmacs,
                    row.peak_fraction
                        .map_or("-".into(), |f| format!("{:.0}%", f * 100.0)),
                    row.speedup_vs_std
                        .map_or("-".into(), |s| format!("{s:.2}x")),
                    row.mac_ratio_vs_std
                        .map_or("-".into(), |r| format!("{r:.2}x")),
                );
                rows.push(row);
            }
        }
    }
    if let Some(path) = &a.json {
        let text =
            serde_json::to_string_pretty(&rows).map_err(|e| Error::Runtime(e.to_string()))?;
        sepconv::io::write_atomic(path, text.as_bytes())?;
        println!("wrote {}", path.display());
    }
    Ok(())
}
