//! `sepconv eval`: test accuracy, loss, confusion matrix and throughput of a checkpoint.

use std::path::PathBuf;

use sepconv::train::{checkpoint, data, evaluate};
use sepconv::{Error, Exec, Result};

use crate::progress::default_data_dir;

/// Evaluate a checkpoint: test accuracy, loss, confusion matrix, images/s.
///
/// Runs the network in evaluation mode on the test split of an MNIST-format dataset; the
/// confusion matrix has true classes as rows and predictions as columns.
#[derive(clap::Args)]
pub struct Args {
    /// A checkpoint written by `sepconv train` (RUN_DIR/checkpoint.safetensors).
    #[arg(long, value_name = "FILE")]
    checkpoint: PathBuf,
    /// Dataset folder [default: data/mnist].
    #[arg(long, value_name = "DIR")]
    data: Option<PathBuf>,
    /// Evaluate on the first N test images only.
    #[arg(long, value_name = "N")]
    test_limit: Option<usize>,
    /// Images per forward pass.
    #[arg(long, default_value_t = 1000)]
    batch_size: usize,
    /// Also write the results as JSON.
    #[arg(long, value_name = "FILE")]
    json: Option<PathBuf>,
}

pub fn run(exec: Exec, a: Args) -> Result<()> {
    if a.batch_size == 0 || a.test_limit == Some(0) {
        return Err(Error::invalid(
            "--batch-size and --test-limit must be at least 1",
        ));
    }
    let mut ckpt = checkpoint::load(&a.checkpoint)?;
    let net = &mut ckpt.network;
    let dir = a.data.unwrap_or_else(default_data_dir);
    let mut test = data::load_checked_split(&dir, "t10k", &net.shapes()[0], net.output_len())?;
    if let Some(n) = a.test_limit {
        test.truncate(n);
    }
    let e = evaluate(net, exec, &test, a.batch_size)?;
    println!(
        "{} (epoch {}) on {} test images: accuracy {:.2}%, loss {:.4}, {:.0} images/s ({} thread(s))",
        net.spec().name,
        ckpt.meta.epoch,
        test.len(),
        e.accuracy * 100.0,
        e.loss,
        e.images_per_second,
        exec.threads()
    );
    println!("confusion matrix (rows: true class, columns: predicted):");
    let classes = e.confusion.len();
    print!("      ");
    for c in 0..classes {
        print!("{c:>6}");
    }
    println!();
    for (t, row) in e.confusion.iter().enumerate() {
        print!("{t:>6}");
        for v in row {
            print!("{v:>6}");
        }
        println!();
    }
    if let Some(p) = &a.json {
        let text = serde_json::to_string_pretty(&e).map_err(|e| Error::Runtime(e.to_string()))?;
        sepconv::io::write_atomic(p, text.as_bytes())?;
    }
    Ok(())
}
