//! `sepconv train`: train a network on an MNIST-format dataset, with checkpoints and metrics.

use std::path::PathBuf;

use sepconv::nn::ModelSpec;
use sepconv::train::optim::{OptimizerConfig, OptimizerKind, Schedule};
use sepconv::train::{RunDir, TrainConfig, Trainer, checkpoint, load_data};
use sepconv::{Error, Exec, Result};

use crate::progress::{default_data_dir, fit_with_progress};

/// Train a network (a preset or a TOML model spec) on an MNIST-format dataset.
///
/// After every epoch it evaluates on the test set and writes RUN_DIR/checkpoint.safetensors
/// (weights, BatchNorm statistics, optimizer state, the model spec and the settings) and
/// RUN_DIR/metrics.jsonl (one line per epoch), each atomically. Ctrl-C stops after the current
/// step and keeps the checkpoint of the last completed epoch; `--resume RUN_DIR` continues.
#[derive(clap::Args)]
#[command(
    after_help = "Presets: mnist-ref-std, mnist-ref-ds, mnist-ref-sp (files under examples/).\n\
    Example: sepconv train --model mnist-ref-ds --epochs 3 --out runs/ds"
)]
pub struct Args {
    /// A preset name or a TOML model spec file.
    #[arg(long, value_name = "PRESET|FILE", required_unless_present = "resume")]
    model: Option<String>,
    /// Dataset folder with train-/t10k- images and labels (IDX, raw or .gz) [default: data/mnist].
    #[arg(long, value_name = "DIR")]
    data: Option<PathBuf>,
    /// Epochs to train (in total, when resuming).
    #[arg(long)]
    epochs: Option<usize>,
    /// Images per step.
    #[arg(long, default_value_t = 64)]
    batch_size: usize,
    /// sgd, adam or adamw.
    #[arg(long, default_value = "adam")]
    optimizer: OptimizerKind,
    /// Base learning rate.
    #[arg(long, default_value_t = 1e-3)]
    lr: f32,
    /// SGD momentum.
    #[arg(long, default_value_t = 0.0)]
    momentum: f32,
    /// Nesterov momentum (SGD).
    #[arg(long)]
    nesterov: bool,
    /// Weight decay [default: 0; 0.01 for adamw].
    #[arg(long)]
    weight_decay: Option<f32>,
    /// Learning-rate schedule: cosine (annealing to 0 over all steps) or constant.
    #[arg(long, default_value = "cosine")]
    schedule: Schedule,
    /// Seed of initialization, shuffling and dropout.
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Train on the first N training images only.
    #[arg(long, value_name = "N")]
    train_limit: Option<usize>,
    /// Evaluate on the first N test images only.
    #[arg(long, value_name = "N")]
    test_limit: Option<usize>,
    /// Run folder for the checkpoint and metrics.
    #[arg(
        long,
        value_name = "RUN_DIR",
        required_unless_present = "resume",
        conflicts_with = "resume"
    )]
    out: Option<PathBuf>,
    /// Print where the time went per layer (forward and backward seconds) at the end.
    #[arg(long)]
    profile: bool,
    /// Continue the run in RUN_DIR from its last completed epoch.
    #[arg(long, value_name = "RUN_DIR", conflicts_with = "model")]
    resume: Option<PathBuf>,
}

pub fn run(exec: Exec, a: Args) -> Result<()> {
    let (mut trainer, run) = if let Some(dir) = &a.resume {
        let run = RunDir { dir: dir.clone() };
        let ckpt = checkpoint::load(&run.checkpoint())?;
        let t = Trainer::resume(ckpt, a.epochs, exec)?;
        println!(
            "resuming {} from epoch {} of {} ({})",
            t.net.spec().name,
            t.epochs_done,
            t.config.epochs,
            run.checkpoint().display()
        );
        (t, run)
    } else {
        let spec = ModelSpec::load(a.model.as_deref().unwrap_or_default())?;
        let out = a
            .out
            .clone()
            .ok_or_else(|| Error::invalid("--out RUN_DIR is required"))?;
        let run = RunDir { dir: out };
        if run.checkpoint().exists() {
            return Err(Error::file(
                &run.dir,
                "already holds a run; continue it with --resume, or choose another --out",
            ));
        }
        let mut opt = OptimizerConfig::new(a.optimizer, a.lr);
        opt.momentum = a.momentum;
        opt.nesterov = a.nesterov;
        if let Some(wd) = a.weight_decay {
            opt.weight_decay = wd;
        }
        let config = TrainConfig {
            epochs: a.epochs.unwrap_or(3),
            batch_size: a.batch_size,
            optimizer: opt,
            schedule: a.schedule,
            seed: a.seed,
            train_limit: a.train_limit,
            test_limit: a.test_limit,
        };
        (Trainer::new(&spec, config, exec)?, run)
    };
    let data_dir = a.data.clone().unwrap_or_else(default_data_dir);
    let splits = load_data(&data_dir, &trainer.net, &trainer.config)?;
    std::fs::create_dir_all(&run.dir)
        .map_err(|e| Error::file(&run.dir, format!("cannot create: {e}")))?;
    let macs = trainer.net.macs();
    println!(
        "{}: {} parameters, {} MACs/image forward ({} for a training step); {} training and {} test images from {}; {} thread(s), {}",
        trainer.net.spec().name,
        trainer.net.param_count(),
        macs.forward,
        macs.train(),
        splits.train.len(),
        splits.test.len(),
        splits.dir.display(),
        exec.threads(),
        exec.isa()
    );
    let name = trainer.net.spec().name.clone();
    let records = fit_with_progress(&mut trainer, &splits.train, &splits.test, &run, &name)?;
    if a.profile {
        crate::progress::print_profile(&mut trainer.net);
    }
    if let Some(last) = records.last() {
        println!(
            "done: test accuracy {:.2}% after {} epoch(s); {} and {}",
            last.test_accuracy * 100.0,
            last.epoch,
            run.checkpoint().display(),
            run.metrics().display()
        );
    }
    Ok(())
}
