//! `sepconv train`, `eval` and `compare` end to end on a slice of MNIST, and their refusals of
//! bad data and bad model specs (one line naming the file, exit code 2).

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use sepconv::io::idx::idx_bytes;

fn bin() -> Command {
    Command::new(env!("CARGO_BIN_EXE_sepconv"))
}

fn mnist() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("data/mnist")
}

fn temp_dir(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("sepconv-cli-train-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

fn run(args: &[&str]) -> Output {
    bin().args(args).output().unwrap()
}

fn s(p: &Path) -> String {
    p.to_string_lossy().into_owned()
}

#[test]
fn compare_writes_report() {
    let out = temp_dir("compare");
    let o = run(&[
        "--threads",
        "2",
        "compare",
        "--epochs",
        "1",
        "--train-limit",
        "256",
        "--test-limit",
        "100",
        "--data",
        &s(&mnist()),
        "--out",
        &s(&out),
    ]);
    let stdout = String::from_utf8_lossy(&o.stdout);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    assert!(stdout.contains("Expected time"), "{stdout}");
    assert!(
        stdout.contains("mnist-ref-ds") && stdout.contains("acc e1"),
        "{stdout}"
    );
    let report: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("report.json")).unwrap()).unwrap();
    let variants = report["variants"].as_array().unwrap();
    assert_eq!(variants.len(), 3);
    let macs: Vec<u64> = variants
        .iter()
        .map(|v| v["macs_per_image"].as_u64().unwrap())
        .collect();
    // DESIGN.md's analytic counts (conv + linear MACs per image).
    assert_eq!(macs, vec![7_513_856, 1_176_000, 3_901_184]);
    for v in variants {
        assert!(v["name"].is_string() && v["params"].as_u64().unwrap() > 0);
        let e = &v["epochs"][0];
        assert_eq!(e["epoch"], 1);
        assert!(e["train_seconds"].as_f64().unwrap() > 0.0);
        let acc = e["test_accuracy"].as_f64().unwrap();
        assert!((0.0..=1.0).contains(&acc));
    }
    let svg = std::fs::read_to_string(out.join("report.svg")).unwrap();
    assert!(svg.starts_with("<svg") && svg.contains("Test accuracy per epoch"));
    assert!(out.join("mnist-ref-std/checkpoint.safetensors").exists());
}

#[test]
fn train_then_eval_then_resume() {
    let dir = temp_dir("run");
    let run_dir = dir.join("run");
    let o = run(&[
        "--threads",
        "2",
        "train",
        "--model",
        "mnist-ref-ds",
        "--epochs",
        "1",
        "--train-limit",
        "192",
        "--test-limit",
        "100",
        "--data",
        &s(&mnist()),
        "--out",
        &s(&run_dir),
    ]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    assert!(
        run_dir.join("checkpoint.safetensors").exists() && run_dir.join("metrics.jsonl").exists()
    );
    // Training into an existing run is refused.
    let o = run(&[
        "train",
        "--model",
        "mnist-ref-ds",
        "--data",
        &s(&mnist()),
        "--out",
        &s(&run_dir),
    ]);
    assert_eq!(o.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&o.stderr).contains("--resume"));
    // Resume to 2 epochs.
    let o = run(&[
        "--threads",
        "2",
        "train",
        "--resume",
        &s(&run_dir),
        "--epochs",
        "2",
        "--data",
        &s(&mnist()),
    ]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let metrics = std::fs::read_to_string(run_dir.join("metrics.jsonl")).unwrap();
    assert_eq!(metrics.lines().count(), 2);
    // Evaluate.
    let o = run(&[
        "--threads",
        "2",
        "eval",
        "--checkpoint",
        &s(&run_dir.join("checkpoint.safetensors")),
        "--data",
        &s(&mnist()),
        "--test-limit",
        "200",
    ]);
    let stdout = String::from_utf8_lossy(&o.stdout);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    assert!(
        stdout.contains("accuracy") && stdout.contains("confusion matrix"),
        "{stdout}"
    );
}

/// A tiny MNIST-format folder: `n` images of `h`×`w`, labels from `labels`.
fn tiny_dataset(dir: &Path, n: usize, h: usize, w: usize, labels: &[u8]) {
    let images: Vec<u8> = (0..n * h * w).map(|i| (i % 251) as u8).collect();
    for prefix in ["train", "t10k"] {
        std::fs::write(
            dir.join(format!("{prefix}-images-idx3-ubyte")),
            idx_bytes(&[n, h, w], &images),
        )
        .unwrap();
        std::fs::write(
            dir.join(format!("{prefix}-labels-idx1-ubyte")),
            idx_bytes(&[labels.len()], labels),
        )
        .unwrap();
    }
}

#[test]
fn bad_data_and_specs_are_refused() {
    let root = temp_dir("bad");
    let labels: Vec<u8> = (0..8).map(|i| i % 10).collect();
    let mk = |name: &str| {
        let d = root.join(name);
        std::fs::create_dir_all(&d).unwrap();
        d
    };
    // Wrong magic.
    let magic = mk("magic");
    tiny_dataset(&magic, 8, 28, 28, &labels);
    std::fs::write(magic.join("train-images-idx3-ubyte"), b"GARBAGE!").unwrap();
    // Truncated.
    let trunc = mk("trunc");
    tiny_dataset(&trunc, 8, 28, 28, &labels);
    let b = std::fs::read(trunc.join("train-images-idx3-ubyte")).unwrap();
    std::fs::write(trunc.join("train-images-idx3-ubyte"), &b[..b.len() - 100]).unwrap();
    // Count mismatch.
    let count = mk("count");
    tiny_dataset(&count, 8, 28, 28, &labels[..7]);
    // Label out of range.
    let range = mk("range");
    tiny_dataset(&range, 8, 28, 28, &[0, 1, 2, 3, 4, 5, 6, 12]);
    // Wrong image size for the network.
    let size = mk("size");
    tiny_dataset(&size, 8, 20, 20, &labels);
    // Specs.
    let unknown = root.join("unknown.toml");
    std::fs::write(
        &unknown,
        "input = [1, 28, 28]\n[[layers]]\ntype = \"conv3d\"\nout_channels = 4\n",
    )
    .unwrap();
    let shapes = root.join("shapes.toml");
    std::fs::write(
        &shapes,
        "input = [1, 28, 28]\n[[layers]]\ntype = \"linear\"\nout_features = 10\n",
    )
    .unwrap();
    let syntax = root.join("syntax.toml");
    std::fs::write(&syntax, "input = [1, 28, 28\n").unwrap();

    let cases: Vec<(Vec<String>, &str, &str)> = vec![
        (
            vec!["--data".into(), s(&root.join("nope"))],
            "nope",
            "no such folder",
        ),
        (
            vec!["--data".into(), s(&magic)],
            "train-images-idx3-ubyte",
            "not an IDX file",
        ),
        (
            vec!["--data".into(), s(&trunc)],
            "train-images-idx3-ubyte",
            "truncated",
        ),
        (
            vec!["--data".into(), s(&count)],
            "train-labels-idx1-ubyte",
            "7 labels",
        ),
        (
            vec!["--data".into(), s(&range)],
            "train-labels-idx1-ubyte",
            "label 12",
        ),
        (vec!["--data".into(), s(&size)], "size", "expects"),
        (
            vec!["--model".into(), s(&unknown)],
            "unknown.toml",
            "conv3d",
        ),
        (vec!["--model".into(), s(&shapes)], "shapes.toml", "flat"),
        (vec!["--model".into(), s(&syntax)], "syntax.toml", ""),
        (
            vec!["--model".into(), "mnist-ref-xx".into()],
            "mnist-ref-xx",
            "preset",
        ),
        (vec!["--lr=-1".into()], "--lr", "positive"),
    ];
    for (i, (extra, names, why)) in cases.into_iter().enumerate() {
        let out = root.join(format!("run{i}"));
        let mut args: Vec<String> = vec![
            "train".into(),
            "--epochs".into(),
            "1".into(),
            "--out".into(),
            s(&out),
        ];
        if !extra.contains(&"--model".to_string()) {
            args.extend(["--model".into(), "mnist-ref-std".into()]);
        }
        if !extra.contains(&"--data".to_string()) {
            args.extend([
                "--data".into(),
                s(&mnist()),
                "--train-limit".into(),
                "64".into(),
            ]);
        }
        args.extend(extra);
        let o = bin().args(&args).output().unwrap();
        let stderr = String::from_utf8_lossy(&o.stderr);
        assert_eq!(o.status.code(), Some(2), "{args:?}: {stderr}");
        assert_eq!(
            stderr.trim_end().lines().count(),
            1,
            "{args:?}: one line: {stderr}"
        );
        assert!(
            stderr.contains(names) && stderr.contains(why),
            "{args:?}: {stderr:?} should name {names:?} and say {why:?}"
        );
        assert!(!out.join("checkpoint.safetensors").exists());
    }
    // eval of something that is not a checkpoint.
    let o = run(&["eval", "--checkpoint", &s(&unknown)]);
    assert_eq!(o.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&o.stderr).contains("unknown.toml"));
}

#[test]
fn decompose_a_trained_network() {
    let dir = temp_dir("netdec");
    let run_dir = dir.join("run");
    let o = run(&[
        "--threads",
        "2",
        "train",
        "--model",
        "mnist-ref-std",
        "--epochs",
        "1",
        "--train-limit",
        "256",
        "--test-limit",
        "100",
        "--data",
        &s(&mnist()),
        "--out",
        &s(&run_dir),
    ]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let out = dir.join("ds");
    let o = run(&[
        "--threads",
        "2",
        "decompose",
        "--checkpoint",
        &s(&run_dir.join("checkpoint.safetensors")),
        "--to",
        "depthwise-separable",
        "--rank",
        "2",
        "--finetune",
        "1",
        "--train-limit",
        "128",
        "--test-limit",
        "100",
        "--data",
        &s(&mnist()),
        "--out",
        &s(&out),
    ]);
    let stdout = String::from_utf8_lossy(&o.stdout);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    assert!(
        stdout.contains("block2") && stdout.contains("after 1 fine-tuning epoch"),
        "{stdout}"
    );
    let report: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("report.json")).unwrap()).unwrap();
    assert_eq!(report["layers"].as_array().unwrap().len(), 2);
    assert!(report["test_accuracy_after_finetune"].as_f64().is_some());
    // The converted model evaluates from its own checkpoint.
    let o = run(&[
        "eval",
        "--checkpoint",
        &s(&out.join("checkpoint.safetensors")),
        "--data",
        &s(&mnist()),
        "--test-limit",
        "100",
    ]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    assert!(
        std::fs::read_to_string(out.join("model.toml"))
            .unwrap()
            .contains("depthwise_separable_conv2d")
    );
}

/// Ctrl-C (SIGINT) during training stops after the current step, exits with 130 and leaves the
/// checkpoint of the last completed epoch, whole.
#[cfg(unix)]
#[test]
fn sigint_keeps_last_completed_epoch() {
    let dir = temp_dir("sigint");
    let run_dir = dir.join("run");
    let child = bin()
        .args([
            "--threads",
            "2",
            "train",
            "--model",
            "mnist-ref-ds",
            "--epochs",
            "200",
            "--train-limit",
            "640",
            "--test-limit",
            "50",
            "--data",
            &s(&mnist()),
            "--out",
            &s(&run_dir),
        ])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    // Wait for the first completed epoch.
    let metrics = run_dir.join("metrics.jsonl");
    let t0 = std::time::Instant::now();
    while !std::fs::read_to_string(&metrics).is_ok_and(|m| !m.is_empty()) {
        assert!(t0.elapsed().as_secs() < 120, "no epoch finished");
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    let status = Command::new("kill")
        .args(["-INT", &child.id().to_string()])
        .status()
        .unwrap();
    assert!(status.success());
    let out = child.wait_with_output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(130), "{stderr}");
    assert!(
        stderr.contains("interrupted") && stderr.contains("--resume"),
        "{stderr}"
    );
    let ckpt = sepconv::train::checkpoint::load(&run_dir.join("checkpoint.safetensors")).unwrap();
    let lines = std::fs::read_to_string(&metrics).unwrap().lines().count();
    assert!(ckpt.meta.epoch >= 1 && ckpt.meta.epoch < 200);
    assert_eq!(lines, ckpt.meta.epoch, "metrics and checkpoint agree");
    for e in std::fs::read_dir(&run_dir).unwrap() {
        assert!(!e.unwrap().file_name().to_string_lossy().contains(".tmp-"));
    }
}
