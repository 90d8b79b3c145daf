//! `sepconv compare`: train the three mnist-ref variants side by side and report accuracy,
//! time and multiplications.

use std::path::PathBuf;
use std::time::Instant;

use sepconv::io::write_atomic;
use sepconv::nn::ModelSpec;
use sepconv::rng::Rng;
use sepconv::train::{EpochRecord, RunDir, TrainConfig, Trainer, load_data};
use sepconv::{Error, Exec, Result};
use serde::Serialize;

use crate::plot::{Panel, Series, svg};
use crate::progress::{default_data_dir, fit_with_progress};

/// The main job: train standard, depthwise-separable and spatially separable CNNs on MNIST and
/// compare accuracy, time and multiplications.
///
/// Trains mnist-ref-std, mnist-ref-ds and mnist-ref-sp (the reference network with standard,
/// depthwise-separable and spatially separable blocks) with the same seed and recipe (Adam 1e-3,
/// cosine annealing, batch 64), says how long that should take, then prints one table:
/// parameters, forward MACs per image, seconds per epoch, training and inference images/s, and
/// test accuracy after each epoch.
///
/// Writes DIR/report.json, DIR/report.svg (test accuracy per epoch; accuracy against MACs) and
/// each variant's run (checkpoint and metrics) under DIR/<variant>/.
#[derive(clap::Args)]
pub struct Args {
    /// Epochs per variant.
    #[arg(long, default_value_t = 3)]
    epochs: usize,
    /// Dataset folder [default: data/mnist].
    #[arg(long, value_name = "DIR")]
    data: Option<PathBuf>,
    /// Output folder.
    #[arg(long, value_name = "DIR", default_value = "runs/compare")]
    out: PathBuf,
    /// Variants (presets) to train.
    #[arg(
        long,
        value_delimiter = ',',
        default_value = "mnist-ref-std,mnist-ref-ds,mnist-ref-sp"
    )]
    variants: Vec<String>,
    /// Seed of initialization and shuffling (the same for every variant).
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Train on the first N training images only.
    #[arg(long, value_name = "N")]
    train_limit: Option<usize>,
    /// Evaluate on the first N test images only.
    #[arg(long, value_name = "N")]
    test_limit: Option<usize>,
}

#[derive(Serialize)]
struct EpochReport {
    epoch: usize,
    train_seconds: f64,
    train_loss: f64,
    test_loss: f64,
    test_accuracy: f64,
}

#[derive(Serialize)]
struct VariantReport {
    name: String,
    params: usize,
    macs_per_image: u64,
    train_macs_per_image: u64,
    seconds_per_epoch: f64,
    train_images_per_second: f64,
    inference_images_per_second: f64,
    epochs: Vec<EpochReport>,
}

#[derive(Serialize)]
struct Report {
    settings: TrainConfig,
    threads: usize,
    isa: String,
    train_images: usize,
    test_images: usize,
    variants: Vec<VariantReport>,
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    let n = v.len();
    if n == 0 {
        0.0
    } else if !n.is_multiple_of(2) {
        v[n / 2]
    } else {
        0.5 * (v[n / 2 - 1] + v[n / 2])
    }
}

/// Seconds per training step of `spec`, measured on a throwaway copy (so the real run is
/// unaffected): 2 warm-up steps, then the best of 3.
fn time_step(
    spec: &ModelSpec,
    config: &TrainConfig,
    exec: Exec,
    data: &sepconv::train::data::Dataset,
) -> Result<f64> {
    let mut t = Trainer::new(spec, config.clone(), exec)?;
    let idx: Vec<usize> = (0..config.batch_size.min(data.len())).collect();
    let mut rng = Rng::new(0);
    let mut best = f64::INFINITY;
    for i in 0..5 {
        let t0 = Instant::now();
        t.step(data, &idx, 1e-4, &mut rng)?;
        if i >= 2 {
            best = best.min(t0.elapsed().as_secs_f64());
        }
    }
    Ok(best)
}

pub fn run(exec: Exec, a: Args) -> Result<()> {
    let mut config = TrainConfig::reference();
    config.epochs = a.epochs;
    config.seed = a.seed;
    config.train_limit = a.train_limit;
    config.test_limit = a.test_limit;
    config.validate()?;
    let specs: Vec<ModelSpec> = a
        .variants
        .iter()
        .map(|v| ModelSpec::load(v))
        .collect::<Result<_>>()?;
    if specs.is_empty() {
        return Err(Error::invalid("--variants is empty"));
    }
    let data_dir = a.data.clone().unwrap_or_else(default_data_dir);
    let probe = Trainer::new(&specs[0], config.clone(), exec)?;
    let splits = load_data(&data_dir, &probe.net, &config)?;
    drop(probe);
    std::fs::create_dir_all(&a.out)
        .map_err(|e| Error::file(&a.out, format!("cannot create: {e}")))?;

    // Say what will happen and how long it should take before starting.
    let steps = splits.train.len().div_ceil(config.batch_size);
    let mut estimates = Vec::new();
    for spec in &specs {
        let step = time_step(spec, &config, exec, &splits.train)?;
        // Test evaluation costs about a third of a training step per image (forward only).
        let epoch = step
            * steps as f64
            * (1.0 + splits.test.len() as f64 / splits.train.len() as f64 / 3.0);
        estimates.push((spec.name.clone(), epoch));
    }
    let total: f64 = estimates
        .iter()
        .map(|(_, e)| e * config.epochs as f64)
        .sum();
    println!(
        "Training {} for {} epoch(s) each on {} images (test: {}), batch {}, Adam lr {} with cosine annealing, seed {}, {} thread(s), {}.",
        specs
            .iter()
            .map(|s| s.name.as_str())
            .collect::<Vec<_>>()
            .join(", "),
        config.epochs,
        splits.train.len(),
        splits.test.len(),
        config.batch_size,
        config.optimizer.lr,
        config.seed,
        exec.threads(),
        exec.isa()
    );
    println!(
        "Expected time: about {:.0} s ({}).",
        total,
        estimates
            .iter()
            .map(|(n, e)| format!("{n} ~{e:.0} s/epoch"))
            .collect::<Vec<_>>()
            .join(", ")
    );

    let mut reports = Vec::new();
    for spec in &specs {
        let mut trainer = Trainer::new(spec, config.clone(), exec)?;
        let run = RunDir {
            dir: a.out.join(&spec.name),
        };
        std::fs::create_dir_all(&run.dir)
            .map_err(|e| Error::file(&run.dir, format!("cannot create: {e}")))?;
        // A comparison always starts fresh: drop an earlier run's metrics.
        let _ = std::fs::remove_file(run.metrics());
        let records =
            fit_with_progress(&mut trainer, &splits.train, &splits.test, &run, &spec.name)?;
        let macs = trainer.net.macs();
        reports.push(VariantReport {
            name: spec.name.clone(),
            params: trainer.net.param_count(),
            macs_per_image: macs.forward,
            train_macs_per_image: macs.train(),
            seconds_per_epoch: median(records.iter().map(|r| r.train_seconds).collect()),
            train_images_per_second: median(
                records.iter().map(|r| r.train_images_per_second).collect(),
            ),
            inference_images_per_second: median(
                records.iter().map(|r| r.test_images_per_second).collect(),
            ),
            epochs: records.iter().map(epoch_report).collect(),
        });
    }

    print_table(&reports, config.epochs);
    let report = Report {
        settings: config,
        threads: exec.threads(),
        isa: exec.isa().to_string(),
        train_images: splits.train.len(),
        test_images: splits.test.len(),
        variants: reports,
    };
    let json = serde_json::to_string_pretty(&report).map_err(|e| Error::Runtime(e.to_string()))?;
    write_atomic(&a.out.join("report.json"), json.as_bytes())?;
    write_atomic(
        &a.out.join("report.svg"),
        chart(&report.variants)?.as_bytes(),
    )?;
    println!(
        "wrote {} and {}",
        a.out.join("report.json").display(),
        a.out.join("report.svg").display()
    );
    Ok(())
}

fn epoch_report(r: &EpochRecord) -> EpochReport {
    EpochReport {
        epoch: r.epoch,
        train_seconds: r.train_seconds,
        train_loss: r.train_loss,
        test_loss: r.test_loss,
        test_accuracy: r.test_accuracy,
    }
}

fn print_table(reports: &[VariantReport], epochs: usize) {
    let std_macs = reports.first().map_or(1, |r| r.macs_per_image) as f64;
    let std_secs = reports.first().map_or(1.0, |r| r.seconds_per_epoch);
    print!(
        "\n{:<14} {:>8} {:>12} {:>7} {:>9} {:>7} {:>9} {:>10}",
        "variant", "params", "MACs/image", "MACs %", "s/epoch", "time %", "train/s", "infer/s"
    );
    for e in 1..=epochs {
        print!(" {:>8}", format!("acc e{e}"));
    }
    println!();
    for r in reports {
        print!(
            "{:<14} {:>8} {:>12} {:>6.1}% {:>9.1} {:>6.1}% {:>9.0} {:>10.0}",
            r.name,
            r.params,
            r.macs_per_image,
            100.0 * r.macs_per_image as f64 / std_macs,
            r.seconds_per_epoch,
            100.0 * r.seconds_per_epoch / std_secs,
            r.train_images_per_second,
            r.inference_images_per_second
        );
        for e in &r.epochs {
            print!(" {:>7.2}%", e.test_accuracy * 100.0);
        }
        println!();
    }
    println!(
        "(MACs % and time % are relative to the first variant; MACs are nominal forward multiply-accumulates per image.)"
    );
}

fn chart(reports: &[VariantReport]) -> Result<String> {
    let per_epoch = Panel {
        title: "Test accuracy per epoch".into(),
        x_label: "epoch".into(),
        y_label: "test accuracy (%)".into(),
        series: reports
            .iter()
            .map(|r| Series {
                name: r.name.clone(),
                points: r
                    .epochs
                    .iter()
                    .map(|e| (e.epoch as f64, e.test_accuracy * 100.0))
                    .collect(),
            })
            .collect(),
        lines: true,
        log_x: false,
        integer_x: true,
        legend_upper: false,
    };
    let vs_macs = Panel {
        title: "Final test accuracy vs multiplications".into(),
        x_label: "forward MACs per image (millions)".into(),
        y_label: "test accuracy (%)".into(),
        series: reports
            .iter()
            .map(|r| Series {
                name: r.name.clone(),
                points: r
                    .epochs
                    .last()
                    .map(|e| vec![(r.macs_per_image as f64 / 1e6, e.test_accuracy * 100.0)])
                    .unwrap_or_default(),
            })
            .collect(),
        lines: false,
        log_x: false,
        integer_x: false,
        legend_upper: false,
    };
    svg(&[per_epoch, vs_macs], 560, 420)
}
