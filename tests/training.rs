//! Training on a slice of the shipped MNIST: the loss falls and accuracy beats chance widely;
//! runs are deterministic; checkpoints round-trip and resume exactly; a diverging run stops
//! with the step number and keeps the last good checkpoint; an interrupted run keeps the last
//! completed epoch.

use std::path::{Path, PathBuf};
use std::sync::atomic::AtomicBool;

use sepconv::Exec;
use sepconv::nn::ModelSpec;
use sepconv::train::data::{Dataset, load_splits};
use sepconv::train::{
    EpochRecord, Observer, RunDir, Silent, TrainConfig, Trainer, checkpoint, evaluate, fit,
};

fn data_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("data/mnist")
}

fn small_data(train: usize, test: usize) -> (Dataset, Dataset) {
    let mut s = load_splits(&data_dir(), &[1, 28, 28], 10).unwrap();
    s.train.truncate(train);
    s.test.truncate(test);
    (s.train, s.test)
}

fn config(epochs: usize) -> TrainConfig {
    TrainConfig {
        epochs,
        batch_size: 32,
        ..TrainConfig::reference()
    }
}

fn temp_run(name: &str) -> RunDir {
    let d = std::env::temp_dir().join(format!("sepconv-train-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    RunDir { dir: d }
}

/// Records every step's running loss.
struct Losses(Vec<f64>);
impl Observer for Losses {
    fn step(&mut self, _s: usize, loss: f64, _a: f64, _i: f64) {
        self.0.push(loss);
    }
}

#[test]
fn short_training_learns() {
    let (train, test) = small_data(960, 500);
    for preset in ["mnist-ref-std", "mnist-ref-ds", "mnist-ref-sp"] {
        let spec = ModelSpec::load(preset).unwrap();
        let mut t = Trainer::new(&spec, config(1), Exec::new(2)).unwrap();
        let before = evaluate(&mut t.net, Exec::new(2), &test, 250).unwrap();
        let mut losses = Losses(Vec::new());
        let (records, interrupted) = fit(
            &mut t,
            &train,
            &test,
            None,
            &mut losses,
            &AtomicBool::new(false),
        )
        .unwrap();
        assert!(!interrupted);
        let r = &records[0];
        // The running mean after the first step is that step's loss.
        assert!(
            r.train_loss < losses.0[0] * 0.7,
            "{preset}: loss {} vs first {}",
            r.train_loss,
            losses.0[0]
        );
        assert!(
            r.test_loss < before.loss,
            "{preset}: test loss did not fall"
        );
        assert!(
            r.test_accuracy > 0.6,
            "{preset}: accuracy {} (chance 0.1)",
            r.test_accuracy
        );
    }
}

#[test]
fn same_seed_same_threads_gives_identical_runs() {
    let (train, test) = small_data(320, 200);
    let spec = ModelSpec::load("mnist-ref-ds").unwrap();
    let run = |seed: u64| -> Vec<EpochRecord> {
        let mut c = config(2);
        c.seed = seed;
        let mut t = Trainer::new(&spec, c, Exec::new(2)).unwrap();
        fit(
            &mut t,
            &train,
            &test,
            None,
            &mut Silent,
            &AtomicBool::new(false),
        )
        .unwrap()
        .0
    };
    let strip = |r: Vec<EpochRecord>| -> Vec<(f64, f64, f64, f64)> {
        r.into_iter()
            .map(|e| (e.train_loss, e.train_accuracy, e.test_loss, e.test_accuracy))
            .collect()
    };
    let a = strip(run(1));
    assert_eq!(a, strip(run(1)));
    assert_ne!(a, strip(run(2)));
}

#[test]
fn checkpoints_round_trip_and_resume_exactly() {
    let (train, test) = small_data(256, 200);
    let spec = ModelSpec::load("mnist-ref-sp").unwrap();
    // Two epochs straight.
    let straight = temp_run("straight");
    let mut t = Trainer::new(&spec, config(2), Exec::new(2)).unwrap();
    let (full, _) = fit(
        &mut t,
        &train,
        &test,
        Some(&straight),
        &mut Silent,
        &AtomicBool::new(false),
    )
    .unwrap();
    // The same run stopped before its second epoch, then resumed from the checkpoint.
    struct StopAtEpoch2<'a>(&'a AtomicBool);
    impl Observer for StopAtEpoch2<'_> {
        fn epoch_start(&mut self, e: usize, _s: usize) {
            if e == 2 {
                self.0.store(true, std::sync::atomic::Ordering::SeqCst);
            }
        }
    }
    let split = temp_run("split");
    let mut t = Trainer::new(&spec, config(2), Exec::new(2)).unwrap();
    let stop = AtomicBool::new(false);
    let (_, interrupted) = fit(
        &mut t,
        &train,
        &test,
        Some(&split),
        &mut StopAtEpoch2(&stop),
        &stop,
    )
    .unwrap();
    assert!(interrupted);
    let ckpt = checkpoint::load(&split.checkpoint()).unwrap();
    assert_eq!(ckpt.meta.epoch, 1);
    let mut t = Trainer::resume(ckpt, None, Exec::new(2)).unwrap();
    let (resumed, _) = fit(
        &mut t,
        &train,
        &test,
        Some(&split),
        &mut Silent,
        &AtomicBool::new(false),
    )
    .unwrap();
    assert_eq!(resumed.len(), 2, "metrics keep the first epoch");
    assert_eq!(full[1].train_loss, resumed[1].train_loss);
    assert_eq!(full[1].test_accuracy, resumed[1].test_accuracy);
    assert_eq!(split.read_metrics().unwrap().len(), 2);
    // A loaded checkpoint evaluates exactly as the network it was saved from.
    let mut loaded = checkpoint::load(&straight.checkpoint()).unwrap();
    let a = evaluate(&mut loaded.network, Exec::new(2), &test, 100).unwrap();
    let b = evaluate(&mut t.net, Exec::new(2), &test, 100).unwrap();
    assert_eq!(a.accuracy, full[1].test_accuracy);
    assert_eq!(a.loss, b.loss);
}

fn no_temp_files(dir: &Path) {
    for e in std::fs::read_dir(dir).unwrap() {
        let name = e.unwrap().file_name();
        assert!(!name.to_string_lossy().contains(".tmp-"), "left {name:?}");
    }
}

#[test]
fn diverging_run_stops_and_keeps_last_good_checkpoint() {
    let (train, test) = small_data(128, 100);
    let spec = ModelSpec::load("mnist-ref-std").unwrap();
    let run = temp_run("nan");
    let mut t = Trainer::new(&spec, config(2), Exec::new(2)).unwrap();
    t.config.epochs = 1;
    fit(
        &mut t,
        &train,
        &test,
        Some(&run),
        &mut Silent,
        &AtomicBool::new(false),
    )
    .unwrap();
    // Poison a weight: the next step's loss is NaN.
    t.config.epochs = 2;
    t.net.params_mut()[0].1.value[0] = f32::NAN;
    let err = fit(
        &mut t,
        &train,
        &test,
        Some(&run),
        &mut Silent,
        &AtomicBool::new(false),
    )
    .unwrap_err();
    let msg = err.to_string();
    assert!(msg.contains("NaN") && msg.contains("step 5"), "{msg}");
    assert!(!err.is_user_error());
    let ckpt = checkpoint::load(&run.checkpoint()).unwrap();
    assert_eq!(ckpt.meta.epoch, 1);
    no_temp_files(&run.dir);
}

#[test]
fn interrupted_run_keeps_last_completed_epoch() {
    let (train, test) = small_data(128, 100);
    let spec = ModelSpec::load("mnist-ref-ds").unwrap();
    let run = temp_run("stop");
    let mut t = Trainer::new(&spec, config(3), Exec::new(2)).unwrap();
    // Raise the stop flag during the second epoch.
    struct StopInEpoch2<'a>(&'a AtomicBool, usize);
    impl Observer for StopInEpoch2<'_> {
        fn epoch_start(&mut self, e: usize, _s: usize) {
            self.1 = e;
        }
        fn step(&mut self, s: usize, _l: f64, _a: f64, _i: f64) {
            if self.1 == 2 && s == 2 {
                self.0.store(true, std::sync::atomic::Ordering::SeqCst);
            }
        }
    }
    let stop = AtomicBool::new(false);
    let (records, interrupted) = fit(
        &mut t,
        &train,
        &test,
        Some(&run),
        &mut StopInEpoch2(&stop, 0),
        &stop,
    )
    .unwrap();
    assert!(interrupted);
    assert_eq!(records.len(), 1);
    assert_eq!(checkpoint::load(&run.checkpoint()).unwrap().meta.epoch, 1);
    assert_eq!(run.read_metrics().unwrap().len(), 1);
    no_temp_files(&run.dir);
}

/// A network converted with the exact multiplier (K = 9 for 3×3 kernels) computes what the
/// original computed; with K = 1 it is cheaper and different.
#[test]
fn network_conversion_is_exact_at_full_rank() {
    use sepconv::decompose::Truncation;
    use sepconv::decompose::network::to_depthwise_separable;
    use sepconv::rng::Rng;
    let (_, test) = small_data(0, 64);
    let spec = ModelSpec::load("mnist-ref-std").unwrap();
    let mut t = Trainer::new(&spec, config(1), Exec::new(2)).unwrap();
    let mut x = Vec::new();
    let mut y = Vec::new();
    test.gather(&(0..64).collect::<Vec<_>>(), &mut x, &mut y);
    let want = t
        .net
        .forward(Exec::new(2), &x, 64, false, &mut Rng::new(0))
        .unwrap()
        .to_vec();
    let (mut exact, report) = to_depthwise_separable(&mut t.net, Truncation::Rank(9)).unwrap();
    assert_eq!(
        report.len(),
        2,
        "block2 and block3 (conv1 has one input channel)"
    );
    assert!(
        report
            .iter()
            .all(|r| r.relative_error < 1e-5 && r.exact_k == 9)
    );
    let got = exact
        .forward(Exec::new(2), &x, 64, false, &mut Rng::new(0))
        .unwrap()
        .to_vec();
    let scale = want.iter().fold(1.0f32, |m, v| m.max(v.abs()));
    let err = got
        .iter()
        .zip(&want)
        .fold(0.0f32, |m, (a, b)| m.max((a - b).abs()))
        / scale;
    assert!(err < 1e-4, "max relative logit error {err}");
    let (cheap, report) = to_depthwise_separable(&mut t.net, Truncation::Rank(1)).unwrap();
    assert!(report.iter().all(|r| r.macs_after < r.macs_before / 5));
    assert!(cheap.macs().forward < t.net.macs().forward / 2);
    // The converted spec round-trips through TOML.
    let text = exact.spec().to_toml().unwrap();
    let again = ModelSpec::parse(&text, "converted").unwrap();
    assert_eq!(again.layers, exact.spec().layers);
}
