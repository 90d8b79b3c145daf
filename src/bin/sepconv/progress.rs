//! Progress bars for training (indicatif), and the shared `--data` default.

use std::path::PathBuf;

use indicatif::{ProgressBar, ProgressStyle};
use sepconv::train::{EpochRecord, Observer};

/// Draws one progress bar per epoch with loss, accuracy, images/s and ETA, and prints a
/// summary line per epoch.
pub struct Bars {
    label: String,
    bar: Option<ProgressBar>,
    epochs: usize,
}

impl Bars {
    pub fn new(label: &str, epochs: usize) -> Self {
        Bars {
            label: label.to_string(),
            bar: None,
            epochs,
        }
    }
}

impl Observer for Bars {
    fn epoch_start(&mut self, epoch: usize, steps: usize) {
        let bar = ProgressBar::new(steps as u64);
        bar.set_style(
            ProgressStyle::with_template("{prefix} [{bar:30}] {pos}/{len} {msg} ETA {eta}")
                .unwrap_or_else(|_| ProgressStyle::default_bar())
                .progress_chars("=> "),
        );
        bar.set_prefix(format!("{} epoch {epoch}/{}", self.label, self.epochs));
        self.bar = Some(bar);
    }
    fn step(&mut self, step: usize, loss: f64, accuracy: f64, images_per_second: f64) {
        if let Some(b) = &self.bar {
            b.set_position(step as u64);
            if step.is_multiple_of(10) || step == 1 {
                b.set_message(format!(
                    "loss {loss:.4} acc {:.2}% {images_per_second:.0} img/s",
                    accuracy * 100.0
                ));
            }
        }
    }
    fn epoch_end(&mut self, r: &EpochRecord) {
        if let Some(b) = self.bar.take() {
            b.finish_and_clear();
        }
        println!(
            "{} epoch {}/{}: train loss {:.4} acc {:.2}%, test loss {:.4} acc {:.2}%, {:.1} s ({:.0} img/s train, {:.0} img/s inference)",
            self.label,
            r.epoch,
            self.epochs,
            r.train_loss,
            r.train_accuracy * 100.0,
            r.test_loss,
            r.test_accuracy * 100.0,
            r.train_seconds,
            r.train_images_per_second,
            r.test_images_per_second
        );
    }
}

/// The default dataset folder: `data/mnist` under the current directory, else the copy shipped
/// in the source tree this binary was built from.
pub fn default_data_dir() -> PathBuf {
    let here = PathBuf::from("data/mnist");
    if here.is_dir() {
        return here;
    }
    let shipped = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("data/mnist");
    if shipped.is_dir() { shipped } else { here }
}

/// A flag raised by Ctrl-C, checked by the training loop between steps. One per process: the
/// handler can be installed only once, and `compare` trains several networks in a row.
pub fn interrupt_flag() -> std::sync::Arc<std::sync::atomic::AtomicBool> {
    static FLAG: std::sync::OnceLock<std::sync::Arc<std::sync::atomic::AtomicBool>> =
        std::sync::OnceLock::new();
    FLAG.get_or_init(install_interrupt_handler).clone()
}

fn install_interrupt_handler() -> std::sync::Arc<std::sync::atomic::AtomicBool> {
    let flag = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let f = flag.clone();

    // If a handler cannot be installed (already installed in this process), Ctrl-C simply
    // terminates: the last checkpoint is still whole because every write is atomic.
    let _ = ctrlc::set_handler(move || {
        if f.swap(true, std::sync::atomic::Ordering::SeqCst) {
            std::process::exit(130);
        }
        eprintln!("\nsepconv: interrupted; stopping after this step (Ctrl-C again to quit now)");
    });
    flag
}

/// Prints the per-layer time accumulated by the network (forward, backward, share of total).
pub fn print_profile(net: &mut sepconv::nn::Network) {
    let t = net.take_timings();
    let total: f64 = t.iter().map(|(f, b)| f + b).sum::<f64>().max(1e-12);
    println!(
        "{:<12} {:<28} {:>10} {:>10} {:>7}",
        "layer", "type", "fwd s", "bwd s", "share"
    );
    for (i, (l, (f, b))) in net.layers().iter().zip(&t).enumerate() {
        let note = if let Some(head) = net.runs_inside(i) {
            Some(format!("(runs inside {})", net.layers()[head].name))
        } else if net.is_view(i) {
            Some("(a view of its input: no copy)".to_string())
        } else {
            None
        };
        if let Some(note) = note {
            println!("{:<12} {:<28} {:>21}", l.name, l.module.kind(), note);
            continue;
        }
        println!(
            "{:<12} {:<28} {:>10.3} {:>10.3} {:>6.1}%",
            l.name,
            l.module.kind(),
            f,
            b,
            100.0 * (f + b) / total
        );
    }
    println!(
        "{:<12} {:<28} {:>10.3} {:>10.3}",
        "total",
        "",
        t.iter().map(|x| x.0).sum::<f64>(),
        t.iter().map(|x| x.1).sum::<f64>()
    );
}

/// Trains with progress bars until the configured epochs; on Ctrl-C, says where the last
/// completed epoch is kept and exits with code 130.
pub fn fit_with_progress(
    trainer: &mut sepconv::train::Trainer,
    train: &sepconv::train::data::Dataset,
    test: &sepconv::train::data::Dataset,
    run: &sepconv::train::RunDir,
    label: &str,
) -> sepconv::Result<Vec<EpochRecord>> {
    let stop = interrupt_flag();
    let mut bars = Bars::new(label, trainer.config.epochs);
    let (records, interrupted) =
        sepconv::train::fit(trainer, train, test, Some(run), &mut bars, &stop)?;
    if interrupted {
        eprintln!(
            "sepconv: interrupted; {} holds the last completed epoch ({}); continue with --resume {}",
            run.checkpoint().display(),
            trainer.epochs_done,
            run.dir.display()
        );
        std::process::exit(130);
    }
    Ok(records)
}
