//! `sepconv bench`: the reference layer set A–E, every variant and pass, side by side.

use std::collections::HashMap;
use std::path::PathBuf;
use std::time::Duration;

use sepconv::bench::{
    MemoryBandwidth, Pass, ReferenceLayer, Timing, VARIANTS, Variant, Workload,
    core_to_core_round_trip_ns, fma_peak_gmacs, memory_bandwidth, round_trip_note, time_samples,
};
use sepconv::{Error, Exec, Result};
use serde::Serialize;

/// Time the reference layer set A–E, every variant and pass (optionally next to PyTorch).
///
/// The layers of DESIGN.md (f32, NCHW, 3×3, 'same' except layer A): variants std (M→N), dw
/// (depthwise on M), pw (1×1 M→N), ds (dw then pw) and sp (3×1 M→R then 1×3 R→N, R = min(M, N));
/// passes forward and train (forward + grad-input + grad-weight).
///
/// Reports the median and minimum of the timed runs, GMAC/s (nominal MACs / minimum time; a
/// training step counts 3 × the forward MACs), the share of this machine's FMA peak (measured
/// before and after the runs, the higher kept), and for ds and sp the realized speedup over std
/// next to the MAC ratio. The depthwise-separable passes that run fused kernels are timed again
/// as two layers, one after the other (the intermediate through memory), and the fusion's gain
/// is reported. Also measured before the runs: the memory bandwidth (GB/s read and
/// written by streaming a 256 MiB buffer), the bound of the passes that move more bytes than
/// their multiplications take time for.
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
    /// Images per layer instead of the reference batch (8; layer A: 1), e.g. 1 for
    /// single-image inference; --compare-torch runs PyTorch on the same batch.
    #[arg(long, value_name = "N")]
    batch: Option<usize>,
    /// Untimed runs before timing.
    #[arg(long, default_value_t = 3)]
    warmup: usize,
    /// Minimum timed runs (more for fast cases, up to 200, to get about 0.25 s of samples).
    #[arg(long, default_value_t = 10)]
    reps: usize,
    /// Times over every layer, variant and pass (and with --compare-torch PyTorch's, after
    /// each of ours); each row keeps the runs of every round, so a slow spell of a shared
    /// machine during one round does not decide it.
    #[arg(long, default_value_t = 1, value_name = "N")]
    rounds: usize,
    /// Skip the FMA peak, memory bandwidth and core-to-core latency measurements.
    #[arg(long)]
    no_peak: bool,
    /// Also write the results as a JSON list of objects.
    #[arg(long, value_name = "FILE")]
    json: Option<PathBuf>,
    /// Also run PyTorch on the same layers (bench/peers_torch.py) in this run and print the
    /// time ratios against the performance targets (each row's: max(f × PyTorch's time, its
    /// MACs at 85% of the measured FMA peak), and which of the two set it); skipped with a
    /// message if torch is missing.
    #[arg(long)]
    compare_torch: bool,
    /// The Python interpreter for --compare-torch: a command on PATH or a path to the file
    /// (which must exist).
    #[arg(long, default_value = "python3", value_name = "PATH")]
    python: String,
    /// Write the results as a Markdown table (with the machine they were measured on) between
    /// the section's markers, `<!-- bench:start -->` and `<!-- bench:end -->` (with --batch N:
    /// `bench-batch-N:start` and `:end`; see --markdown-section): an existing FILE keeps
    /// everything outside them (this is how the README's tables are regenerated) and must have
    /// them, checked before anything runs; a new FILE is the table between the markers.
    #[arg(long, value_name = "FILE")]
    markdown: Option<PathBuf>,
    /// The name in the markers --markdown writes between (`<!-- NAME:start -->`, `<!--
    /// NAME:end -->`), so one file can hold tables from several machines; letters, digits, `-`
    /// and `_`. Default: `bench`, or `bench-batch-N` with --batch N.
    #[arg(long, value_name = "NAME", requires = "markdown")]
    markdown_section: Option<String>,
}

/// The start and end markers of the Markdown section named `name`.
fn section_markers(name: &str) -> (String, String) {
    (
        format!("<!-- {name}:start -->"),
        format!("<!-- {name}:end -->"),
    )
}

/// The Markdown section's name: --markdown-section, else by the batch (the reference batches'
/// table and each other batch's have their own).
fn section_name(a: &Args) -> Result<String> {
    match &a.markdown_section {
        Some(name) => {
            let ok = !name.is_empty()
                && name
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_');
            if ok {
                Ok(name.clone())
            } else {
                Err(Error::invalid(format!(
                    "--markdown-section '{name}': use letters, digits, '-' and '_'"
                )))
            }
        }
        None => Ok(a
            .batch
            .map_or("bench".to_string(), |n| format!("bench-batch-{n}"))),
    }
}

/// Where the lines of the section's start marker and, after it, its end marker begin in
/// `text`; `None` when `text` lacks them. A marker counts only on a line of its own: a file
/// that mentions the markers in its prose (this project's README does, in backticks) keeps
/// that prose, where a plain search had put the table inside it.
fn section_span(text: &str, name: &str) -> Option<(usize, usize)> {
    let (start, end) = section_markers(name);
    let mut begin = None;
    let mut offset = 0;
    for line in text.split_inclusive('\n') {
        match begin {
            None if line.trim() == start => begin = Some(offset),
            Some(i) if line.trim() == end => return Some((i, offset)),
            _ => {}
        }
        offset += line.len();
    }
    None
}

/// `old` with the text between the section's markers replaced by `table`, or `None` when `old`
/// lacks them.
fn replace_section(old: &str, name: &str, table: &str) -> Option<String> {
    let (i, j) = section_span(old, name)?;
    let (start, _) = section_markers(name);
    Some(format!("{}{start}\n{table}{}", &old[..i], &old[j..]))
}

/// Checks that the folder `path` is to be written in exists (named by `flag` if not), before
/// minutes of benchmarking rather than at the write after them.
fn check_folder_exists(flag: &str, path: &std::path::Path) -> Result<()> {
    match path.parent() {
        Some(dir) if !dir.as_os_str().is_empty() && !dir.is_dir() => Err(Error::invalid(format!(
            "{flag} {}: no such folder {}",
            path.display(),
            dir.display()
        ))),
        _ => Ok(()),
    }
}

/// Checks, before minutes of benchmarking, that --markdown can be written as asked: a file that
/// exists must be readable text with the section's markers (its other text is kept; without
/// them there is nowhere to put the table but over it).
fn check_markdown_target(path: &std::path::Path, name: &str) -> Result<()> {
    let old = match std::fs::read_to_string(path) {
        Ok(old) => old,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            return check_folder_exists("--markdown", path);
        }
        Err(e) => {
            return Err(Error::invalid(format!(
                "--markdown {}: cannot read it ({e})",
                path.display()
            )));
        }
    };
    match section_span(&old, name) {
        Some(_) => Ok(()),
        None => {
            let (start, end) = section_markers(name);
            Err(Error::invalid(format!(
                "--markdown {}: the file has no {start} ... {end} markers to put the table \
                 between (add them, or name a new file)",
                path.display()
            )))
        }
    }
}

#[derive(Serialize)]
struct Row {
    layer: String,
    /// Images per pass.
    batch: usize,
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
    /// PyTorch's best time for the same layer, variant and pass (with --compare-torch).
    torch_min_ms: Option<f64>,
    /// The performance target in ms (with --compare-torch and a measured peak).
    target_ms: Option<f64>,
    /// Which term of the target's rule set it: "0.9 × PyTorch" (the factor times PyTorch's
    /// time) or "85% of peak" (the floor of MACs at 85% of the measured FMA peak).
    target_by: Option<String>,
    /// ds: whether the pass ran fused kernels (`ConvPair::runs_fused`).
    fused: Option<bool>,
    /// ds, where fused: the minimum of the same pass as two layers, the intermediate through
    /// memory.
    unfused_min_ms: Option<f64>,
}

pub fn run(exec: Exec, a: Args) -> Result<()> {
    if a.reps == 0 {
        return Err(Error::invalid("--reps must be at least 1"));
    }
    if a.rounds == 0 {
        return Err(Error::invalid("--rounds must be at least 1"));
    }
    if a.batch == Some(0) {
        return Err(Error::invalid("--batch must be at least 1"));
    }
    // A path the user gave that names no file is a mistake to report, not a missing torch to
    // skip (a bare name is looked up on PATH when the probe runs).
    if a.compare_torch
        && a.python.contains(std::path::MAIN_SEPARATOR)
        && !std::path::Path::new(&a.python).is_file()
    {
        return Err(Error::invalid(format!(
            "--python {}: no such file",
            a.python
        )));
    }
    let section = section_name(&a)?;
    if let Some(path) = &a.markdown {
        check_markdown_target(path, &section)?;
    }
    if let Some(path) = &a.json {
        check_folder_exists("--json", path)?;
    }
    let layers: Vec<ReferenceLayer> = a
        .layers
        .iter()
        .map(|l| {
            let layer = ReferenceLayer::by_id(l)?;
            Ok(a.batch.map_or(layer, |n| layer.with_batch(n)))
        })
        .collect::<Result<_>>()?;
    if let Some(n) = a.batch {
        println!("batch: {n} image(s) per layer");
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
    let bandwidth = if a.no_peak {
        None
    } else {
        let b = memory_bandwidth(exec)?;
        println!(
            "memory bandwidth ({} thread(s)): read {:.1} GB/s, write {:.1} GB/s",
            exec.threads(),
            b.read_gbs,
            b.write_gbs
        );
        Some(b)
    };
    let round_trip = |when: &str| {
        let ns = core_to_core_round_trip_ns();
        if let Some(ns) = ns {
            println!("core-to-core round trip{when}: {ns:.0} ns");
            if let Some(note) = round_trip_note(ns) {
                println!("note: {note}");
            }
        }
        ns
    };
    let round_trip_before = if a.no_peak || exec.threads() < 2 {
        None
    } else {
        round_trip("")
    };
    let torch_ok = a.compare_torch && torch_importable(&a.python);
    // Every round's run times per (layer, variant, pass), PyTorch's best per row.
    let mut samples: HashMap<(char, Variant, Pass), Vec<f64>> = HashMap::new();
    // The fused ds passes' runs as two layers.
    let mut unfused: HashMap<(char, Pass), Vec<f64>> = HashMap::new();
    let mut macs: HashMap<(char, Variant), (u64, u64)> = HashMap::new();
    let mut torch: Option<TorchBest> = None;
    for round in 1..=a.rounds {
        // Progress: the rows print once every round has run.
        if a.rounds > 1 {
            print!("round {round} of {}: timing", a.rounds);
        } else {
            print!("timing");
        }
        for layer in &layers {
            print!(" {}", layer.id);
            let _ = std::io::Write::flush(&mut std::io::stdout());
            for &variant in &variants {
                let mut w = Workload::new(layer, variant)?;
                macs.entry((layer.id, variant)).or_insert_with(|| {
                    let cost = w.cost();
                    (cost.forward_macs_nominal, cost.train_macs_nominal())
                });
                for &pass in &a.passes {
                    let runs = time_samples(a.warmup, a.reps, Duration::from_millis(250), || {
                        w.run(exec, pass)
                    })?;
                    samples
                        .entry((layer.id, variant, pass))
                        .or_default()
                        .extend(runs);
                    if variant == Variant::Ds && w.runs_fused(exec, pass) {
                        let runs =
                            time_samples(a.warmup, a.reps, Duration::from_millis(250), || {
                                w.run_unfused(exec, pass)
                            })?;
                        unfused.entry((layer.id, pass)).or_default().extend(runs);
                    }
                }
            }
        }
        println!();
        if torch_ok {
            let best = run_torch(&a, exec, &layers, &variants)?;
            torch = Some(match torch.take() {
                Some(earlier) => earlier.merge(best),
                None => best,
            });
        }
    }
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
            let (fwd_macs, train_macs) = macs[&(layer.id, variant)];
            for &pass in &a.passes {
                let runs = samples.remove(&(layer.id, variant, pass));
                let t = Timing::of(runs.expect("every row is timed in every round"));
                let macs = if pass == Pass::Train {
                    train_macs
                } else {
                    fwd_macs
                };
                let gmacs = macs as f64 / (t.min_ms * 1e-3) / 1e9;
                if variant == Variant::Std {
                    std_times.insert((layer.id, pass), (t.min_ms, fwd_macs));
                }
                // ds: the same pass as two layers, where it ran fused.
                let two_layers = (variant == Variant::Ds).then(|| {
                    let runs = unfused.remove(&(layer.id, pass));
                    runs.map(|runs| Timing::of(runs).min_ms)
                });
                let vs_std = matches!(variant, Variant::Ds | Variant::Sp)
                    .then(|| std_times.get(&(layer.id, pass)))
                    .flatten();
                let row = Row {
                    layer: layer.id.to_string(),
                    batch: layer.batch,
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
                    torch_min_ms: None,
                    target_ms: None,
                    target_by: None,
                    fused: two_layers.map(|t| t.is_some()),
                    unfused_min_ms: two_layers.flatten(),
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
    // Measured again after the runs, keeping the higher: no run can exceed the machine's peak,
    // so a low measurement is a disturbance (another tenant on a core), and a halved peak
    // would halve the floors of the targets below. The table above used the first value.
    let peak = peak.map(|first| {
        let again = fma_peak_gmacs(exec);
        if again > first {
            println!("FMA peak measured again after the runs: {again:.1} GMAC/s (used below)");
            for row in &mut rows {
                row.peak_fraction = Some(row.gmacs_per_s / again);
            }
        }
        first.max(again)
    });
    if let Some(p) = peak {
        report_ds_peak(&rows, p);
    }
    for line in fusion_gains(&rows) {
        println!("{line}");
    }
    // Measured again too: the spells in which a VM's two vCPUs sit on different dies can start
    // or end during the runs, and they slow the kernels that split images over the threads.
    let round_trips = round_trip_before.map(|before| {
        let after = round_trip(" measured again after the runs").unwrap_or(before);
        (before, after)
    });
    let torch_version = match &torch {
        Some(best) => {
            report_against_torch(&layers, best, peak, &mut rows);
            best.version.clone()
        }
        None => None,
    };
    if let Some(path) = &a.markdown {
        let measured = Measured {
            exec,
            batch: a.batch,
            rounds: a.rounds,
            peak,
            bandwidth,
            round_trips,
            torch: torch_version.as_deref(),
        };
        write_markdown(path, &section, &rows, &measured)?;
        println!("wrote {}", path.display());
    }
    if let Some(path) = &a.json {
        let text =
            serde_json::to_string_pretty(&rows).map_err(|e| Error::Runtime(e.to_string()))?;
        sepconv::io::write_atomic(path, text.as_bytes())?;
        println!("wrote {}", path.display());
    }
    Ok(())
}

/// The depthwise-separable forward's share of the FMA peak on the reference layers B–E, which
/// the performance issue asks to be at least 80% (the pass is compute-bound: its floor is
/// MACs / peak).
fn report_ds_peak(rows: &[Row], peak: f64) {
    for r in rows
        .iter()
        .filter(|r| r.layer != "A" && r.variant == Variant::Ds && r.pass == Pass::Forward)
    {
        let share = r.gmacs_per_s / peak;
        println!(
            "{} ds forward: {:.1} GMAC/s, {:.1}% of the FMA peak (asked: at least 80%){}",
            r.layer,
            r.gmacs_per_s,
            100.0 * share,
            if share < 0.8 { " — below" } else { "" }
        );
    }
}

/// The depthwise-separable rows that were timed for the fusion, each with the same pass's
/// minimum as two layers where it ran fused (`None`: not fused at this batch and thread count).
/// The console and Markdown reports word them differently from this one list.
fn fusion_comparisons(rows: &[Row]) -> impl Iterator<Item = (&Row, Option<f64>)> {
    rows.iter()
        .filter(|r| r.fused.is_some())
        .map(|r| (r, r.unfused_min_ms))
}

/// One line per depthwise-separable row: the fused pass against the same pass as two layers
/// (the performance issue asks the fusion's gain to be reported), or that nothing is fused there.
fn fusion_gains(rows: &[Row]) -> Vec<String> {
    fusion_comparisons(rows)
        .map(|(r, two_layers)| match two_layers {
            Some(two) => format!(
                "{} ds {}: fused {} ms, as two layers {} ms (the intermediate through memory): \
                 the fused pass {:.2}x as fast",
                r.layer,
                r.pass,
                ms(r.min_ms),
                ms(two),
                two / r.min_ms
            ),
            None => format!(
                "{} ds {}: not fused at this batch and thread count (two layers, one after the \
                 other)",
                r.layer, r.pass
            ),
        })
        .collect()
}

/// Milliseconds with three significant digits or three decimals, whichever shows more (layer
/// A's passes take a microsecond or less).
fn ms(x: f64) -> String {
    let decimals = if x > 0.0 {
        (2 - x.log10().floor() as i32).max(3) as usize
    } else {
        3
    };
    format!("{x:.decimals$}")
}

/// Where the repo's copy of the PyTorch peer script is.
fn peers_script() -> PathBuf {
    let shipped = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("bench/peers_torch.py");
    if shipped.is_file() {
        shipped
    } else {
        PathBuf::from("bench/peers_torch.py")
    }
}

/// The rule: time <= max(f × PyTorch, MACs / (0.85 × peak)), with f = 1.0 for std (and
/// for every variant of the small layer A, forward), 0.9 forward and 0.5 training otherwise.
/// Returns the target in ms and which of the two terms set it: a row held to the floor asks for
/// 85% of the machine's peak, whatever PyTorch does.
fn target(row: &Row, torch_ms: f64, peak: Option<f64>) -> Option<(f64, String)> {
    let f = match (row.layer.as_str(), row.variant, row.pass) {
        ("A", _, Pass::Train) => return None,
        ("A", _, Pass::Forward) | (_, Variant::Std, _) => 1.0,
        (_, _, Pass::Forward) => 0.9,
        (_, _, Pass::Train) => 0.5,
    };
    let floor = peak.map_or(0.0, |p| row.macs as f64 / (0.85 * p * 1e9) * 1e3);
    Some(if floor > f * torch_ms {
        (floor, "85% of peak".to_string())
    } else {
        (f * torch_ms, format!("{f:.1} × PyTorch"))
    })
}

/// Whether `python` imports torch and numpy (`--compare-torch` says so and skips PyTorch when
/// not).
fn torch_importable(python: &str) -> bool {
    let probe = std::process::Command::new(python)
        .args(["-c", "import torch, numpy"])
        .output();
    if !matches!(&probe, Ok(o) if o.status.success()) {
        println!(
            "--compare-torch: skipped, `{python} -c 'import torch, numpy'` failed (install them, or pass --python)"
        );
        return false;
    }
    true
}

/// PyTorch's best time per (layer, variant, pass), and its version.
struct TorchBest {
    /// Forward: the better of NCHW and channels_last.
    ms: HashMap<(String, String, Pass), f64>,
    version: Option<String>,
}

impl TorchBest {
    /// Keeps `ms` for `key` if it is the best so far.
    fn keep_best(&mut self, key: (String, String, Pass), ms: f64) {
        let e = self.ms.entry(key).or_insert(f64::INFINITY);
        *e = e.min(ms);
    }

    /// The better time of each row of two runs.
    fn merge(mut self, other: TorchBest) -> TorchBest {
        for (key, ms) in other.ms {
            self.keep_best(key, ms);
        }
        TorchBest {
            version: self.version.or(other.version),
            ..self
        }
    }
}

/// Runs the repo's PyTorch peer script on the same layers, variants and passes.
fn run_torch(
    a: &Args,
    exec: Exec,
    layers: &[ReferenceLayer],
    variants: &[Variant],
) -> Result<TorchBest> {
    let script = peers_script();
    let out = std::env::temp_dir().join(format!("sepconv-peers-{}.json", std::process::id()));
    let configs: Vec<String> = layers.iter().map(|l| l.id.to_string()).collect();
    let vars: Vec<String> = variants.iter().map(|v| v.to_string()).collect();
    let mut cmd = std::process::Command::new(&a.python);
    cmd.arg(&script)
        .args([
            "--json",
            &out.to_string_lossy(),
            "--configs",
            &configs.join(","),
            "--variants",
            &vars.join(","),
        ])
        .args([
            "--threads",
            &exec.threads().to_string(),
            "--no-ort",
            "--no-peak",
            "--quiet-threshold",
            "-1",
            // The same sampling as sepconv's side, so both minimums come from as many runs.
            "--reps",
            &a.reps.to_string(),
            "--warmup",
            &a.warmup.to_string(),
        ]);

    if !a.passes.contains(&Pass::Train) {
        cmd.arg("--no-train");
    }
    if let Some(n) = a.batch {
        cmd.args(["--batch", &n.to_string()]);
    }
    println!(
        "\nRunning PyTorch on the same layers ({})…",
        script.display()
    );
    let status = cmd
        .stdout(std::process::Stdio::null())
        .status()
        .map_err(|e| Error::Runtime(format!("running {}: {e}", a.python)))?;
    if !status.success() {
        return Err(Error::Runtime(format!(
            "{} failed ({status})",
            script.display()
        )));
    }
    let text = std::fs::read_to_string(&out)
        .map_err(|e| Error::Runtime(format!("reading {}: {e}", out.display())))?;
    let _ = std::fs::remove_file(&out);
    let json: serde_json::Value =
        serde_json::from_str(&text).map_err(|e| Error::Runtime(format!("peer results: {e}")))?;
    let mut best = TorchBest {
        ms: HashMap::new(),
        version: json["meta"]["torch"]
            .as_str()
            .map(|v| format!("PyTorch {v}")),
    };
    for r in json["results"].as_array().into_iter().flatten() {
        let (Some(c), Some(v), Some(m), Some(ms)) = (
            r["config"].as_str(),
            r["variant"].as_str(),
            r["mode"].as_str(),
            r["min_ms"].as_f64(),
        ) else {
            continue;
        };
        let pass = match m {
            "fwd" | "fwd_cl" => Pass::Forward,
            "train" | "train_cl" => Pass::Train,
            _ => continue,
        };
        best.keep_best((c.to_string(), v.to_string(), pass), ms);
    }
    Ok(best)
}

/// Fills in each row's PyTorch time and target, and prints the comparison: the targets met,
/// and the realized speedup of ds over the faster std against the MAC ratio.
fn report_against_torch(
    layers: &[ReferenceLayer],
    best: &TorchBest,
    peak: Option<f64>,
    rows: &mut [Row],
) {
    let torch = &best.ms;
    println!(
        "{:<5} {:<4} {:<8} {:>11} {:>10} {:>7} {:>10} {:<13} {:>5}",
        "layer", "var", "pass", "sepconv ms", "torch ms", "ratio", "target ms", "set by", "met"
    );
    let (mut met, mut total) = (0, 0);
    for row in rows.iter_mut() {
        let Some(&t) = torch.get(&(row.layer.clone(), row.variant.to_string(), row.pass)) else {
            continue;
        };
        row.torch_min_ms = Some(t);
        (row.target_ms, row.target_by) = target(row, t, peak).unzip();
        let ok = row.target_ms.map(|target| row.min_ms <= target);
        if let Some(ok) = ok {
            total += 1;
            met += usize::from(ok);
        }
        println!(
            "{:<5} {:<4} {:<8} {:>11.3} {:>10.3} {:>6.2}x {:>10} {:<13} {:>5}",
            row.layer,
            row.variant.to_string(),
            row.pass.to_string(),
            row.min_ms,
            t,
            row.min_ms / t,
            row.target_ms.map_or("-".into(), |x| format!("{x:.3}")),
            row.target_by.as_deref().unwrap_or("-"),
            ok.map_or("-", |o| if o { "yes" } else { "no" })
        );
    }
    println!(
        "{met} of {total} targets met (time <= max(f × PyTorch best, MACs / (0.85 × measured FMA peak)); f = 1.0 std and layer A, 0.9 forward, 0.5 train)."
    );
    // Realized speedup of ds over the faster std (sepconv's or PyTorch's) against the MAC ratio.
    for layer in layers.iter().filter(|l| l.id != 'A') {
        for pass in [Pass::Forward, Pass::Train] {
            let find = |v: Variant| {
                rows.iter()
                    .find(|r| r.layer == layer.id.to_string() && r.variant == v && r.pass == pass)
            };
            let (Some(std), Some(ds)) = (find(Variant::Std), find(Variant::Ds)) else {
                continue;
            };
            let best_std = std.torch_min_ms.map_or(std.min_ms, |t| t.min(std.min_ms));
            let ratio = std.forward_macs as f64 / ds.forward_macs as f64;
            let realized = best_std / ds.min_ms;
            let want = if pass == Pass::Forward { 0.85 } else { 0.75 };
            println!(
                "{} ds {pass}: {realized:.2}x faster than the faster std, MAC ratio {ratio:.2}x → {:.0}% of the ideal (target {:.0}%)",
                layer.id,
                100.0 * realized / ratio,
                100.0 * want
            );
        }
    }
}

/// The CPU's model name, from /proc/cpuinfo where there is one.
fn cpu_model() -> String {
    std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|t| {
            let field = |key: &str| {
                t.lines()
                    .find(|l| l.starts_with(key))
                    .and_then(|l| l.split(':').nth(1))
                    .map(|v| v.trim().to_string())
            };
            let name = field("model name")?;
            Some(match (field("cpu family"), field("model")) {
                (Some(f), Some(m)) => format!("{name} (family {f}, model {m})"),
                _ => name,
            })
        })
        .unwrap_or_else(|| std::env::consts::ARCH.to_string())
}

/// Writes the rows as a Markdown table, into the markers of an existing file or as a new file.
/// What a table was measured with, for its first line.
struct Measured<'a> {
    exec: Exec,
    batch: Option<usize>,
    rounds: usize,
    peak: Option<f64>,
    bandwidth: Option<MemoryBandwidth>,
    /// Core-to-core round trips in ns, before and after the runs.
    round_trips: Option<(f64, f64)>,
    /// PyTorch's version, when it ran in the same run.
    torch: Option<&'a str>,
}

fn write_markdown(
    path: &std::path::Path,
    section: &str,
    rows: &[Row],
    m: &Measured<'_>,
) -> Result<()> {
    use std::fmt::Write;
    let Measured {
        exec,
        batch,
        rounds,
        peak,
        bandwidth,
        round_trips,
        torch,
    } = *m;
    let mut t = String::new();
    let _ = writeln!(
        t,
        "Measured by `sepconv bench{}{}{}` on {}, {} thread(s), {}{}{}{}{}.\n",
        batch.map_or(String::new(), |n| format!(" --batch {n}")),
        if rounds > 1 {
            format!(" --rounds {rounds}")
        } else {
            String::new()
        },
        if torch.is_some() {
            " --compare-torch"
        } else {
            ""
        },
        cpu_model(),
        exec.threads(),
        exec.isa(),
        peak.map_or(String::new(), |p| format!(
            ", FMA peak {p:.0} GMAC/s (measured)"
        )),
        bandwidth.map_or(String::new(), |b| format!(
            ", memory {:.0} GB/s read and {:.0} GB/s written (measured)",
            b.read_gbs, b.write_gbs
        )),
        round_trips.map_or(String::new(), |(before, after)| format!(
            ", core-to-core round trip {before:.0} ns before the runs and {after:.0} after \
             (measured)"
        )),
        torch.map_or(String::new(), |v| format!(
            "; {v} in the same run, best of NCHW and channels_last{}",
            if rounds > 1 {
                format!(" (each side's runs from {rounds} alternating rounds)")
            } else {
                String::new()
            }
        ))
    );
    let _ = writeln!(
        t,
        "| layer | variant | pass | MACs | sepconv ms | GMAC/s | % peak | PyTorch ms | ratio | target ms | set by | met |"
    );
    let _ = writeln!(
        t,
        "|---|---|---|---:|---:|---:|---:|---:|---:|---:|---|---|"
    );
    for r in rows {
        let _ = writeln!(
            t,
            "| {} | {} | {} | {} | {:.3} | {:.1} | {} | {} | {} | {} | {} | {} |",
            r.layer,
            r.variant,
            r.pass,
            r.macs,
            r.min_ms,
            r.gmacs_per_s,
            r.peak_fraction
                .map_or("-".into(), |f| format!("{:.0}%", f * 100.0)),
            r.torch_min_ms.map_or("-".into(), |v| format!("{v:.3}")),
            r.torch_min_ms
                .map_or("-".into(), |v| format!("{:.2}×", r.min_ms / v)),
            r.target_ms.map_or("-".into(), |v| format!("{v:.3}")),
            r.target_by.as_deref().unwrap_or("-"),
            r.target_ms
                .map_or("-", |v| if r.min_ms <= v { "yes" } else { "no" }),
        );
    }
    let gains: Vec<String> = fusion_comparisons(rows)
        .map(|(r, two_layers)| match two_layers {
            Some(two) => format!(
                "{} {} {} against {} ({:.2}×)",
                r.layer,
                r.pass,
                ms(r.min_ms),
                ms(two),
                two / r.min_ms
            ),
            None => format!("{} {}: not fused", r.layer, r.pass),
        })
        .collect();
    if !gains.is_empty() {
        let _ = writeln!(
            t,
            "\nThe depthwise-separable rows, fused against the same pass as two layers one after \
             the other (the intermediate through memory), min ms: {}.",
            gains.join("; ")
        );
    }
    // Between the section's markers: in the file as it is now (checked before the runs, but
    // it may have changed since), or in a new file.
    let text = match std::fs::read_to_string(path) {
        Ok(old) => replace_section(&old, section, &t).ok_or_else(|| {
            Error::invalid(format!(
                "--markdown {}: its {section} markers were removed during the run; the table \
                 was not written",
                path.display()
            ))
        })?,
        Err(_) => {
            let (start, end) = section_markers(section);
            format!("{start}\n{t}{end}\n")
        }
    };
    sepconv::io::write_atomic(path, text.as_bytes())
}
