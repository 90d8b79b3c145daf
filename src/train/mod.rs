//! Training: data, loss, optimizers, the epoch loop with test evaluation, checkpoints and
//! per-epoch metrics.

pub mod checkpoint;
pub mod data;
pub mod loss;
pub mod optim;

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Instant;

use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};
use crate::io::write_atomic;
use crate::kernels::Exec;
use crate::nn::{ModelSpec, Network};
use crate::rng::Rng;
use data::Dataset;
use optim::{Optimizer, OptimizerConfig, Schedule};

/// Everything that determines a training run (stored in checkpoints).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct TrainConfig {
    /// Epochs to train in total.
    pub epochs: usize,
    /// Images per step.
    pub batch_size: usize,
    /// Optimizer and its hyper-parameters.
    pub optimizer: OptimizerConfig,
    /// Learning-rate schedule.
    pub schedule: Schedule,
    /// Seed of initialization, shuffling and dropout.
    pub seed: u64,
    /// Use only the first N training images.
    pub train_limit: Option<usize>,
    /// Use only the first N test images.
    pub test_limit: Option<usize>,
}

impl TrainConfig {
    /// The reference recipe of DESIGN.md: Adam 1e-3, cosine annealing, batch 64, 3 epochs, seed 0.
    pub fn reference() -> Self {
        TrainConfig {
            epochs: 3,
            batch_size: 64,
            optimizer: OptimizerConfig::new(optim::OptimizerKind::Adam, 1e-3),
            schedule: Schedule::Cosine,
            seed: 0,
            train_limit: None,
            test_limit: None,
        }
    }

    /// Checks ranges.
    pub fn validate(&self) -> Result<()> {
        if self.epochs == 0 || self.batch_size == 0 {
            return Err(Error::invalid(
                "--epochs and --batch-size must be at least 1",
            ));
        }
        if self.train_limit == Some(0) || self.test_limit == Some(0) {
            return Err(Error::invalid(
                "--train-limit and --test-limit must be at least 1",
            ));
        }
        self.optimizer.validate()
    }
}

/// One line of metrics.jsonl.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct EpochRecord {
    /// 1-based epoch.
    pub epoch: usize,
    /// Mean training loss over the epoch.
    pub train_loss: f64,
    /// Training accuracy over the epoch (fraction).
    pub train_accuracy: f64,
    /// Test loss after the epoch.
    pub test_loss: f64,
    /// Test accuracy after the epoch (fraction in [0, 1]).
    pub test_accuracy: f64,
    /// Wall seconds of the training part of the epoch.
    pub train_seconds: f64,
    /// Training throughput.
    pub train_images_per_second: f64,
    /// Inference throughput on the test set.
    pub test_images_per_second: f64,
    /// Learning rate at the end of the epoch.
    pub lr: f64,
}

/// The result of evaluating a network on a dataset.
#[derive(Clone, Debug, Serialize)]
pub struct Evaluation {
    /// Mean loss.
    pub loss: f64,
    /// Accuracy (fraction).
    pub accuracy: f64,
    /// `confusion[true][predicted]` counts.
    pub confusion: Vec<Vec<u64>>,
    /// Wall seconds.
    pub seconds: f64,
    /// Images per second.
    pub images_per_second: f64,
}

/// Progress reports from the training loop (the command line draws them as progress bars).
pub trait Observer {
    /// An epoch of `steps` steps begins.
    fn epoch_start(&mut self, _epoch: usize, _steps: usize) {}
    /// A step finished: running mean loss and accuracy so far this epoch, images/s.
    fn step(&mut self, _step: usize, _loss: f64, _accuracy: f64, _images_per_second: f64) {}
    /// The epoch finished (training and test evaluation).
    fn epoch_end(&mut self, _record: &EpochRecord) {}
}

/// An observer that reports nothing.
pub struct Silent;
impl Observer for Silent {}

/// A network, its optimizer and settings, and reusable batch buffers.
pub struct Trainer {
    /// The network.
    pub net: Network,
    /// The optimizer state.
    pub opt: Optimizer,
    /// The settings.
    pub config: TrainConfig,
    /// Threads and instruction set.
    pub exec: Exec,
    /// Epochs completed.
    pub epochs_done: usize,
    batch_x: Vec<f32>,
    batch_y: Vec<u8>,
    grad: Vec<f32>,
}

/// A per-epoch generator: shuffling and dropout of epoch e depend only on (seed, e), so a
/// resumed run continues exactly as an uninterrupted one.
fn epoch_rng(seed: u64, epoch: usize, stream: u64) -> Rng {
    Rng::new(
        seed ^ (epoch as u64 + 1).wrapping_mul(0x9E37_79B9_7F4A_7C15)
            ^ stream.wrapping_mul(0xD1B5_4A32_D192_ED03),
    )
}

impl Trainer {
    /// A fresh network from `spec`, initialized from the config's seed.
    pub fn new(spec: &ModelSpec, config: TrainConfig, exec: Exec) -> Result<Self> {
        config.validate()?;
        let mut net = Network::new(spec, config.seed)?;
        let sizes: Vec<usize> = net
            .params_mut()
            .iter()
            .map(|(_, p)| p.value.len())
            .collect();
        let opt = Optimizer::new(config.optimizer, &sizes);
        Ok(Self::from_network(net, opt, config, exec))
    }

    /// Trains an existing network (e.g. a converted one) with a given optimizer state.
    pub fn from_network(net: Network, opt: Optimizer, config: TrainConfig, exec: Exec) -> Self {
        Trainer {
            net,
            opt,
            config,
            exec,
            epochs_done: 0,
            batch_x: Vec::new(),
            batch_y: Vec::new(),
            grad: Vec::new(),
        }
    }

    /// Continues a run from a checkpoint (with its optimizer state), training to `epochs`.
    pub fn resume(ckpt: checkpoint::Checkpoint, epochs: Option<usize>, exec: Exec) -> Result<Self> {
        let mut config = ckpt
            .meta
            .config
            .ok_or_else(|| Error::invalid("the checkpoint has no training settings"))?;
        let opt = ckpt
            .optimizer
            .ok_or_else(|| Error::invalid("the checkpoint has no optimizer state"))?;
        if let Some(e) = epochs {
            config.epochs = e;
        }
        config.validate()?;
        let mut t = Self::from_network(ckpt.network, opt, config, exec);
        t.epochs_done = ckpt.meta.epoch;
        Ok(t)
    }

    /// Steps per epoch over `n` images.
    pub fn steps_per_epoch(&self, n: usize) -> usize {
        n.div_ceil(self.config.batch_size)
    }

    /// One training step on the given images; returns (loss, correct).
    pub fn step(
        &mut self,
        data: &Dataset,
        indices: &[usize],
        lr: f32,
        rng: &mut Rng,
    ) -> Result<(f64, usize)> {
        let batch = indices.len();
        data.gather(indices, &mut self.batch_x, &mut self.batch_y);
        let classes = self.net.output_len();
        let logits = self
            .net
            .forward(self.exec, &self.batch_x, batch, true, rng)?;
        self.grad.resize(logits.len(), 0.0);
        let (loss, correct) =
            loss::softmax_cross_entropy(logits, &self.batch_y, classes, &mut self.grad);
        if !loss.is_finite() {
            return Err(Error::Runtime(format!(
                "the loss became {loss} at step {} (epoch {}); stopping",
                self.opt.step + 1,
                self.epochs_done + 1
            )));
        }
        self.net.backward(self.exec, &self.grad, batch, rng)?;
        let mut params: Vec<_> = self.net.params_mut().into_iter().map(|(_, p)| p).collect();
        self.opt.update(&mut params, lr);
        Ok((loss, correct))
    }

    /// Trains one epoch over `data`. Returns `None` if `stop` was raised (nothing of the
    /// partial epoch should be saved).
    pub fn train_epoch(
        &mut self,
        data: &Dataset,
        observer: &mut dyn Observer,
        stop: &AtomicBool,
    ) -> Result<Option<(f64, f64, f64, f64)>> {
        let epoch = self.epochs_done;
        let steps = self.steps_per_epoch(data.len());
        let total = (steps * self.config.epochs) as u64;
        let order = data.shuffled_indices(&mut epoch_rng(self.config.seed, epoch, 1));
        let mut dropout_rng = epoch_rng(self.config.seed, epoch, 2);
        observer.epoch_start(epoch + 1, steps);
        let t0 = Instant::now();
        let (mut loss_sum, mut correct, mut seen) = (0.0, 0usize, 0usize);
        let mut lr = self.config.optimizer.lr;
        for (s, chunk) in order.chunks(self.config.batch_size).enumerate() {
            if stop.load(Ordering::Relaxed) {
                return Ok(None);
            }
            lr = self
                .config
                .schedule
                .lr(self.config.optimizer.lr, self.opt.step, total);
            let (l, c) = self.step(data, chunk, lr, &mut dropout_rng)?;
            loss_sum += l * chunk.len() as f64;
            correct += c;
            seen += chunk.len();
            let secs = t0.elapsed().as_secs_f64();
            observer.step(
                s + 1,
                loss_sum / seen as f64,
                correct as f64 / seen as f64,
                seen as f64 / secs,
            );
        }
        let secs = t0.elapsed().as_secs_f64();
        self.epochs_done += 1;
        Ok(Some((
            loss_sum / seen as f64,
            correct as f64 / seen as f64,
            secs,
            lr as f64,
        )))
    }

    /// Evaluates on `data` in evaluation mode (running BatchNorm statistics, no dropout).
    pub fn evaluate(&mut self, data: &Dataset, batch_size: usize) -> Result<Evaluation> {
        evaluate(&mut self.net, self.exec, data, batch_size)
    }
}

/// Evaluates `net` on `data`: loss, accuracy, confusion matrix and throughput.
pub fn evaluate(
    net: &mut Network,
    exec: Exec,
    data: &Dataset,
    batch_size: usize,
) -> Result<Evaluation> {
    let classes = net.output_len();
    let mut confusion = vec![vec![0u64; classes]; classes];
    let (mut x, mut y, mut grad) = (Vec::new(), Vec::new(), Vec::new());
    let mut rng = Rng::new(0);
    let (mut loss_sum, mut correct) = (0.0, 0usize);
    let indices: Vec<usize> = (0..data.len()).collect();
    let t0 = Instant::now();
    for chunk in indices.chunks(batch_size.max(1)) {
        data.gather(chunk, &mut x, &mut y);
        let logits = net.forward(exec, &x, chunk.len(), false, &mut rng)?;
        grad.resize(logits.len(), 0.0);
        let (l, c) = loss::softmax_cross_entropy(logits, &y, classes, &mut grad);
        loss_sum += l * chunk.len() as f64;
        correct += c;
        for (row, &label) in logits.chunks_exact(classes).zip(&y) {
            confusion[label as usize][loss::argmax(row).0] += 1;
        }
    }
    let seconds = t0.elapsed().as_secs_f64();
    let n = data.len().max(1) as f64;
    Ok(Evaluation {
        loss: loss_sum / n,
        accuracy: correct as f64 / n,
        confusion,
        seconds,
        images_per_second: n / seconds,
    })
}

/// Where a run keeps its files.
pub struct RunDir {
    /// The folder.
    pub dir: PathBuf,
}

impl RunDir {
    /// The checkpoint path.
    pub fn checkpoint(&self) -> PathBuf {
        self.dir.join("checkpoint.safetensors")
    }
    /// The metrics path.
    pub fn metrics(&self) -> PathBuf {
        self.dir.join("metrics.jsonl")
    }
    /// Reads the metrics of completed epochs (empty if none).
    pub fn read_metrics(&self) -> Result<Vec<EpochRecord>> {
        let path = self.metrics();
        let Ok(text) = std::fs::read_to_string(&path) else {
            return Ok(Vec::new());
        };
        text.lines()
            .filter(|l| !l.trim().is_empty())
            .map(|l| {
                serde_json::from_str(l)
                    .map_err(|e| Error::file(&path, format!("bad metrics line: {e}")))
            })
            .collect()
    }
    /// Rewrites the metrics file (atomically) with `records`.
    pub fn write_metrics(&self, records: &[EpochRecord]) -> Result<()> {
        let mut text = String::new();
        for r in records {
            text.push_str(&serde_json::to_string(r).map_err(|e| Error::Runtime(e.to_string()))?);
            text.push('\n');
        }
        write_atomic(&self.metrics(), text.as_bytes())
    }
}

/// Trains until `trainer.config.epochs`, evaluating on `test` after every epoch and, with a run
/// folder, saving the checkpoint and metrics after every epoch. Returns the epochs' records, or
/// the records so far with `interrupted = true` if `stop` was raised.
pub fn fit(
    trainer: &mut Trainer,
    train: &Dataset,
    test: &Dataset,
    run: Option<&RunDir>,
    observer: &mut dyn Observer,
    stop: &AtomicBool,
) -> Result<(Vec<EpochRecord>, bool)> {
    let mut records = match run {
        Some(r) => {
            let mut m = r.read_metrics()?;
            m.retain(|e| e.epoch <= trainer.epochs_done);
            m
        }
        None => Vec::new(),
    };
    while trainer.epochs_done < trainer.config.epochs {
        let outcome = trainer
            .train_epoch(train, observer, stop)
            .map_err(|e| match (e, run) {
                (Error::Runtime(m), Some(r)) if r.checkpoint().exists() => Error::Runtime(format!(
                    "{m}; {} still holds the last completed epoch",
                    r.checkpoint().display()
                )),
                (e, _) => e,
            })?;
        let Some((train_loss, train_accuracy, train_seconds, lr)) = outcome else {
            return Ok((records, true));
        };
        let eval = trainer.evaluate(test, 1000)?;
        let record = EpochRecord {
            epoch: trainer.epochs_done,
            train_loss,
            train_accuracy,
            test_loss: eval.loss,
            test_accuracy: eval.accuracy,
            train_seconds,
            train_images_per_second: train.len() as f64 / train_seconds,
            test_images_per_second: eval.images_per_second,
            lr,
        };
        if let Some(r) = run {
            let meta = checkpoint::CheckpointMeta {
                epoch: trainer.epochs_done,
                config: Some(trainer.config.clone()),
            };
            checkpoint::save(&r.checkpoint(), &mut trainer.net, Some(&trainer.opt), &meta)?;
            records.push(record.clone());
            r.write_metrics(&records)?;
        } else {
            records.push(record.clone());
        }
        observer.epoch_end(&record);
    }
    Ok((records, false))
}

/// Loads a dataset folder for a network, applying the config's limits.
pub fn load_data(dir: &Path, net: &Network, config: &TrainConfig) -> Result<data::Splits> {
    let mut s = data::load_splits(dir, &net.shapes()[0], net.output_len())?;
    if let Some(n) = config.train_limit {
        s.train.truncate(n);
    }
    if let Some(n) = config.test_limit {
        s.test.truncate(n);
    }
    Ok(s)
}
