//! `sepconv decompose`: the best separable approximation of a conv weight (written as the pair
//! of weights that runs as-is with `sepconv conv`), or of every standard conv of a trained network.

use std::path::PathBuf;

use clap::ValueEnum;
use sepconv::decompose::depthwise::{self, DepthwiseAnalysis};
use sepconv::decompose::network::to_depthwise_separable;
use sepconv::decompose::spatial::{self, SpatialAnalysis};
use sepconv::decompose::{Truncation, Weight, relative_distance};
use sepconv::io::AtomicFiles;
use sepconv::io::npy::{npy_bytes, read_npy};
use sepconv::kernels::{self, Workspace};
use sepconv::rng::Rng;
use sepconv::train::optim::Optimizer;
use sepconv::train::{RunDir, Trainer, checkpoint, evaluate, load_data};
use sepconv::{Conv2dParams, ConvGeometry, ConvPair, Error, Exec, Padding, Result};
use serde::Serialize;

use crate::analyze::load_weights;
use crate::cost::thousands;
use crate::progress::{default_data_dir, fit_with_progress};

/// Which factorization.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum Target {
    /// Depthwise kh×kw with multiplier K, then pointwise 1×1 (per input channel truncated SVD).
    DepthwiseSeparable,
    /// kh×1 conv M→K, then 1×kw conv K→N (truncated SVD of the (M·kh) × (N·kw) matrix).
    Spatial,
}

/// Replace a conv weight (or every conv of a trained network) by its best separable approximation.
///
/// The truncated SVD is optimal in the Frobenius norm; --checkpoint converts every standard conv
/// of a trained network.
///
/// depthwise-separable writes DIR/depthwise.npy [M·K, 1, kh, kw] and DIR/pointwise.npy
/// [N, M·K, 1, 1]; spatial writes DIR/vertical.npy [K, M, kh, 1] and DIR/horizontal.npy
/// [N, K, 1, kw]; both run as-is with `sepconv conv` (the depthwise one with --groups M).
/// It prints the weight error (measured and predicted from the discarded singular values), the
/// MACs before and after, and the output error of the pair against the original on random inputs.
#[derive(clap::Args)]
#[command(
    after_help = "Examples:\n  sepconv decompose --weight w.npy --to depthwise-separable --rank 2 --out dw2\n  \
    sepconv decompose --weight w.npy --to spatial --max-error 0.1 --out sp\n  \
    sepconv decompose --checkpoint runs/compare/mnist-ref-std/checkpoint.safetensors --to depthwise-separable --rank 3 --finetune 1 --out runs/std-as-ds"
)]
pub struct Args {
    /// A weight .npy [N, M, kh, kw] (or a checkpoint with --layer).
    #[arg(
        long,
        value_name = "FILE",
        required_unless_present = "checkpoint",
        conflicts_with = "checkpoint"
    )]
    weight: Option<PathBuf>,
    /// With --weight FILE.safetensors: the layer to decompose.
    #[arg(long, value_name = "NAME", requires = "weight")]
    layer: Option<String>,
    /// A trained network: convert every standard conv with more than one input channel.
    #[arg(long, value_name = "CKPT")]
    checkpoint: Option<PathBuf>,
    /// The factorization.
    #[arg(long, value_enum)]
    to: Target,
    /// Terms to keep (depth multiplier K, or middle channels).
    #[arg(
        long,
        value_name = "K",
        required_unless_present = "max_error",
        conflicts_with = "max_error"
    )]
    rank: Option<usize>,
    /// Keep the fewest terms whose relative Frobenius error is at most E (0 < E < 1).
    #[arg(long, value_name = "E")]
    max_error: Option<f64>,
    /// A bias [N]; passes through to the last conv (written as DIR/bias.npy).
    #[arg(long, value_name = "B.npy", requires = "weight")]
    bias: Option<PathBuf>,
    /// Network mode: dataset folder for test accuracy [default: data/mnist].
    #[arg(long, value_name = "DIR", requires = "checkpoint")]
    data: Option<PathBuf>,
    /// Network mode: fine-tune the converted network for this many epochs.
    #[arg(long, value_name = "EPOCHS", requires = "checkpoint")]
    finetune: Option<usize>,
    /// Network mode: learning rate of the fine-tuning (Adam, cosine annealing).
    #[arg(long, default_value_t = 1e-4, requires = "checkpoint")]
    finetune_lr: f32,
    /// Network mode: evaluate on the first N test images only.
    #[arg(long, value_name = "N", requires = "checkpoint")]
    test_limit: Option<usize>,
    /// Network mode: fine-tune on the first N training images only.
    #[arg(long, value_name = "N", requires = "checkpoint")]
    train_limit: Option<usize>,
    /// Output folder.
    #[arg(long, value_name = "DIR")]
    out: PathBuf,
}

fn truncation(a: &Args) -> Result<Truncation> {
    let t = match (a.rank, a.max_error) {
        (Some(k), _) => Truncation::Rank(k),
        (None, Some(e)) => Truncation::MaxError(e),
        (None, None) => return Err(Error::invalid("give --rank K or --max-error E")),
    };
    t.validate()?;
    Ok(t)
}

pub fn run(exec: Exec, a: Args) -> Result<()> {
    let trunc = truncation(&a)?;
    if a.checkpoint.is_some() {
        return network(exec, &a, trunc);
    }
    let path = a
        .weight
        .clone()
        .ok_or_else(|| Error::invalid("give --weight or --checkpoint"))?;
    let weights = load_weights(&path, a.layer.as_deref())?;
    let [(name, t)] = &weights[..] else {
        return Err(Error::invalid(format!(
            "{} holds several conv weights; choose one with --layer",
            path.display()
        )));
    };
    let w = Weight::from_tensor(t).map_err(|e| e.in_file(&path))?;
    let bias = match &a.bias {
        Some(p) => {
            let b = read_npy(p)?;
            if b.shape() != [w.n] {
                return Err(Error::file(
                    p,
                    format!("bias must have shape [{}], got {:?}", w.n, b.shape()),
                ));
            }
            Some(b)
        }
        None => None,
    };
    std::fs::create_dir_all(&a.out)
        .map_err(|e| Error::file(&a.out, format!("cannot create: {e}")))?;
    let mut files = AtomicFiles::new();
    // Random test input: 2 images of 16×16 (or twice the kernel), 'same' padding, stride 1.
    let side = 16.max(2 * w.kh.max(w.kw));
    let x_shape = [2, w.m, side, side];
    let same = Conv2dParams::with_padding(Padding::Same);
    let (pair, w1, w2, k, predicted, reconstructed, after_macs) = match a.to {
        Target::DepthwiseSeparable => {
            let an = DepthwiseAnalysis::of(&w)?;
            let k = trunc.pick(&an.errors).max(1);
            let f = depthwise::decompose(&w, &an, k)?;
            let rec = depthwise::reconstruct(&f.depthwise, &f.pointwise, w.m)?;
            files.write(&a.out.join("depthwise.npy"), &npy_bytes(&f.depthwise))?;
            files.write(&a.out.join("pointwise.npy"), &npy_bytes(&f.pointwise))?;
            let pair = ConvPair::depthwise_separable(x_shape, k, w.n, (w.kh, w.kw), &same)?;
            (
                pair,
                f.depthwise,
                f.pointwise,
                k,
                f.predicted_error,
                rec,
                depthwise::macs_per_pixel(&w, k),
            )
        }
        Target::Spatial => {
            let an = SpatialAnalysis::of(&w)?;
            let k = trunc.pick(&an.errors).max(1);
            let f = spatial::decompose(&w, &an, k)?;
            let rec = spatial::reconstruct(&f.vertical, &f.horizontal)?;
            files.write(&a.out.join("vertical.npy"), &npy_bytes(&f.vertical))?;
            files.write(&a.out.join("horizontal.npy"), &npy_bytes(&f.horizontal))?;
            let pair = ConvPair::spatially_separable(x_shape, k, w.n, (w.kh, w.kw), &same)?;
            (
                pair,
                f.vertical,
                f.horizontal,
                k,
                f.predicted_error,
                rec,
                spatial::macs_per_pixel(&w, k),
            )
        }
    };
    if let Some(b) = &bias {
        files.write(&a.out.join("bias.npy"), &npy_bytes(b))?;
    }
    // Output error of the pair against the original conv, with the engine.
    let mut rng = Rng::new(1);
    let x: Vec<f32> = (0..x_shape.iter().product::<usize>())
        .map(|_| rng.uniform(-1.0, 1.0))
        .collect();
    let g = ConvGeometry::new(x_shape, t.dims4("weight")?, &same)?;
    let b = bias.as_ref().map(|b| b.data());
    let mut ws = Workspace::new();
    let mut y_ref = vec![0.0; g.output_len()];
    kernels::conv2d_forward(exec, &g, &x, t.data(), b, &mut y_ref, &mut ws)?;
    let mut mid = vec![0.0; pair.first.output_len()];
    let mut y = vec![0.0; pair.second.output_len()];
    pair.forward(exec, &x, w1.data(), w2.data(), b, &mut mid, &mut y, &mut ws)?;
    let output_error = relative_distance(&y, &y_ref);
    let weight_error = relative_distance(reconstructed.data(), t.data());
    files.commit()?;

    let before = w.standard_macs_per_pixel();
    let (label, files_written) = match a.to {
        Target::DepthwiseSeparable => (
            format!("depthwise separable, multiplier K = {k}"),
            format!(
                "{0}/depthwise.npy {1:?} and {0}/pointwise.npy {2:?}",
                a.out.display(),
                w1.shape(),
                w2.shape()
            ),
        ),
        Target::Spatial => (
            format!("spatially separable, R = {k} middle channels"),
            format!(
                "{0}/vertical.npy {1:?} and {0}/horizontal.npy {2:?}",
                a.out.display(),
                w1.shape(),
                w2.shape()
            ),
        ),
    };
    println!("{name} [{}, {}, {}, {}] → {label}", w.n, w.m, w.kh, w.kw);
    println!(
        "  relative weight error ‖W − Ŵ‖/‖W‖: {weight_error:.6} measured, {predicted:.6} predicted from the discarded singular values"
    );
    println!(
        "  MACs per output pixel: {} → {} ({:.1}%)",
        thousands(before),
        thousands(after_macs),
        100.0 * after_macs as f64 / before as f64
    );
    println!(
        "  relative output error against the original conv: {output_error:.6} (random inputs [2, {}, {side}, {side}] uniform in [-1, 1), 'same' padding, stride 1)",
        w.m
    );
    println!(
        "  wrote {files_written}{}",
        if bias.is_some() { " and bias.npy" } else { "" }
    );
    if a.to == Target::DepthwiseSeparable {
        println!(
            "  run the pair: sepconv conv --weight depthwise.npy --groups {} …, then sepconv conv --weight pointwise.npy …",
            w.m
        );
    }
    Ok(())
}

#[derive(Serialize)]
struct NetworkReport {
    layers: Vec<sepconv::decompose::network::LayerConversion>,
    forward_macs_before: u64,
    forward_macs_after: u64,
    test_accuracy_before: f64,
    test_accuracy_after: f64,
    test_accuracy_after_finetune: Option<f64>,
    finetune_epochs: Option<usize>,
}

fn network(exec: Exec, a: &Args, trunc: Truncation) -> Result<()> {
    if a.to != Target::DepthwiseSeparable {
        return Err(Error::invalid(
            "network conversion (--checkpoint) supports --to depthwise-separable",
        ));
    }
    let path = a
        .checkpoint
        .clone()
        .ok_or_else(|| Error::invalid("give --checkpoint"))?;
    let mut ckpt = checkpoint::load(&path)?;
    let mut config = ckpt
        .meta
        .config
        .clone()
        .unwrap_or_else(sepconv::train::TrainConfig::reference);
    config.train_limit = a.train_limit;
    config.test_limit = a.test_limit;
    let data_dir = a.data.clone().unwrap_or_else(default_data_dir);
    let splits = load_data(&data_dir, &ckpt.network, &config)?;
    let before_macs = ckpt.network.macs().forward;
    let before = evaluate(&mut ckpt.network, exec, &splits.test, 1000)?;
    let (mut net, layers) = to_depthwise_separable(&mut ckpt.network, trunc)?;
    if layers.is_empty() {
        return Err(Error::file(
            &path,
            "has no standard convolution with more than one input channel to convert",
        ));
    }
    let after = evaluate(&mut net, exec, &splits.test, 1000)?;
    std::fs::create_dir_all(&a.out)
        .map_err(|e| Error::file(&a.out, format!("cannot create: {e}")))?;
    let run = RunDir { dir: a.out.clone() };
    let mut finetuned = None;
    if let Some(epochs) = a.finetune.filter(|&e| e > 0) {
        let mut cfg = config.clone();
        cfg.epochs = epochs;
        cfg.optimizer.lr = a.finetune_lr;
        cfg.validate()?;
        let sizes: Vec<usize> = net
            .params_mut()
            .iter()
            .map(|(_, p)| p.value.len())
            .collect();
        let opt = Optimizer::new(cfg.optimizer, &sizes);
        let mut trainer = Trainer::from_network(net, opt, cfg, exec);
        let records =
            fit_with_progress(&mut trainer, &splits.train, &splits.test, &run, "fine-tune")?;
        finetuned = records.last().map(|r| r.test_accuracy);
        net = trainer.net;
    } else {
        let meta = checkpoint::CheckpointMeta {
            epoch: 0,
            config: Some(config),
        };
        checkpoint::save(&run.checkpoint(), &mut net, None, &meta)?;
    }
    sepconv::io::write_atomic(&a.out.join("model.toml"), net.spec().source.as_bytes())?;
    let after_macs = net.macs().forward;
    println!(
        "{:<10} {:<16} {:>3} {:>8} {:>11} {:>14} {:>14} {:>7}",
        "layer", "weight", "K", "exact K", "rel. error", "MACs before", "MACs after", "ratio"
    );
    for l in &layers {
        println!(
            "{:<10} {:<16} {:>3} {:>8} {:>11.4} {:>14} {:>14} {:>6.1}%",
            l.name,
            format!("{:?}", l.shape),
            l.k,
            l.exact_k,
            l.relative_error,
            thousands(l.macs_before),
            thousands(l.macs_after),
            100.0 * l.macs_after as f64 / l.macs_before as f64
        );
    }
    println!(
        "network forward MACs per image: {} → {} ({:.1}%)",
        thousands(before_macs),
        thousands(after_macs),
        100.0 * after_macs as f64 / before_macs as f64
    );
    println!(
        "test accuracy on {} images: {:.2}% before, {:.2}% after decomposition{}",
        splits.test.len(),
        100.0 * before.accuracy,
        100.0 * after.accuracy,
        finetuned.map_or(String::new(), |f| format!(
            ", {:.2}% after {} fine-tuning epoch(s) at lr {}",
            100.0 * f,
            a.finetune.unwrap_or(0),
            a.finetune_lr
        ))
    );
    let report = NetworkReport {
        layers,
        forward_macs_before: before_macs,
        forward_macs_after: after_macs,
        test_accuracy_before: before.accuracy,
        test_accuracy_after: after.accuracy,
        test_accuracy_after_finetune: finetuned,
        finetune_epochs: a.finetune,
    };
    let text = serde_json::to_string_pretty(&report).map_err(|e| Error::Runtime(e.to_string()))?;
    sepconv::io::write_atomic(&a.out.join("report.json"), text.as_bytes())?;
    println!(
        "wrote {}, {}/model.toml and {}/report.json",
        run.checkpoint().display(),
        a.out.display(),
        a.out.display()
    );
    Ok(())
}
