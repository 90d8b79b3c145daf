//! `sepconv cost`, `analyze` and `decompose` end to end.

mod common;

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use common::Rng;
use sepconv::Tensor;
use sepconv::decompose::{depthwise, relative_distance};
use sepconv::io::npy::{npy_bytes, read_npy};

fn bin() -> Command {
    Command::new(env!("CARGO_BIN_EXE_sepconv"))
}

fn run(args: &[&str]) -> Output {
    bin().args(args).output().unwrap()
}

fn temp_dir(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("sepconv-cli-an-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

fn save(dir: &Path, name: &str, t: &Tensor) -> String {
    let p = dir.join(name);
    std::fs::write(&p, npy_bytes(t)).unwrap();
    p.to_string_lossy().into_owned()
}

fn stdout(o: &Output) -> String {
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    String::from_utf8_lossy(&o.stdout).into_owned()
}

#[test]
fn cost_walks_through_the_textbook() {
    let out = stdout(&run(&["cost"]));
    for n in [
        "45,630", "4,563", "5,070", "9,633", "1,521", "585", "507", "1,092", "1,170", "225", "169",
    ] {
        assert!(out.contains(n), "textbook output lacks {n}:\n{out}");
    }
    assert!(
        out.contains("same result") && out.contains("13×13"),
        "{out}"
    );
    let json: serde_json::Value = serde_json::from_str(&stdout(&run(&["cost", "--json"]))).unwrap();
    assert_eq!(json["depthwise_separable_example"]["separable_macs"], 9633);
    assert_eq!(json["spatially_separable_example"]["separable_macs"], 1092);
}

/// Output piped into a reader that has gone (`sepconv cost | head -1`) ends the process
/// quietly, as Unix tools do, not with a panic.
#[cfg(target_os = "linux")]
#[test]
fn closed_stdout_is_not_a_panic() {
    use std::process::Stdio;
    let mut child = bin()
        .arg("cost")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    // The reader goes before the child has written anything (it is still starting).
    drop(child.stdout.take());
    let out = child.wait_with_output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!stderr.contains("panicked"), "{stderr}");
}

#[test]
fn cost_of_one_layer_and_a_network() {
    let o = run(&[
        "cost",
        "--input",
        "15x15x3",
        "--kernel",
        "3x3",
        "--filters",
        "10",
        "--json",
    ]);
    let json: serde_json::Value = serde_json::from_str(&stdout(&o)).unwrap();
    let v = json["variants"].as_array().unwrap();
    assert_eq!(v[0]["nominal_macs"], 45630);
    assert_eq!(v[0]["flops"], 91260);
    assert_eq!(v[4]["nominal_macs"], 9633);
    assert!(
        (json["closed_form_ratio_depthwise_separable"]
            .as_f64()
            .unwrap()
            - (0.1 + 1.0 / 9.0))
            .abs()
            < 1e-9
    );
    // 'same' padding: executed < nominal.
    let o = run(&[
        "cost",
        "--input",
        "8x8x4",
        "--kernel",
        "3",
        "--filters",
        "4",
        "--padding",
        "same",
        "--json",
    ]);
    let json: serde_json::Value = serde_json::from_str(&stdout(&o)).unwrap();
    let std = &json["variants"][0];
    assert!(std["executed_macs"].as_u64().unwrap() < std["nominal_macs"].as_u64().unwrap());
    let text = stdout(&run(&[
        "cost",
        "--input",
        "112x112x32",
        "--kernel",
        "3x3",
        "--filters",
        "64",
        "--padding",
        "same",
    ]));
    assert!(text.contains("MACs (nominal)") && text.contains("FLOPs"));
    let json: serde_json::Value = serde_json::from_str(&stdout(&run(&[
        "cost",
        "--model",
        "mnist-ref-std",
        "--json",
    ])))
    .unwrap();
    assert_eq!(json["forward_macs_per_image"], 7_513_856);
    assert_eq!(json["params"], 155_658);
    let text = stdout(&run(&["cost", "--model", "mnist-ref-sp"]));
    assert!(
        text.contains("block2") && text.contains("3,901,184"),
        "{text}"
    );
}

#[test]
fn analyze_verdicts() {
    let dir = temp_dir("analyze");
    let sobel = Tensor::new(
        &[1, 1, 3, 3],
        vec![-1.0, 0.0, 1.0, -2.0, 0.0, 2.0, -1.0, 0.0, 1.0],
    )
    .unwrap();
    let out = stdout(&run(&[
        "analyze",
        "--weight",
        &save(&dir, "sobel.npy", &sobel),
    ]));
    assert!(
        out.contains("every 2-D kernel is spatially separable"),
        "{out}"
    );
    // C[n, m]·B[m].
    let mut rng = Rng::new(2);
    let (b, c) = (rng.vec(3 * 9), rng.vec(4 * 3));
    let w: Vec<f32> = (0..4 * 3 * 9)
        .map(|i| c[i / 9] * b[(i / 9 % 3) * 9 + i % 9])
        .collect();
    let ds = Tensor::new(&[4, 3, 3, 3], w).unwrap();
    let json = dir.join("ds.json");
    let out = stdout(&run(&[
        "analyze",
        "--weight",
        &save(&dir, "ds.npy", &ds),
        "--json",
        &json.to_string_lossy(),
    ]));
    assert!(
        out.contains("exactly depthwise separable with multiplier 1"),
        "{out}"
    );
    // Two 3-channel filters with unproportional slices: not separable at K = 1, exact at K = 2.
    let two = Tensor::new(&[2, 3, 3, 3], rng.vec(54)).unwrap();
    let json = dir.join("two.json");
    let plot = dir.join("two.svg");
    let out = stdout(&run(&[
        "analyze",
        "--weight",
        &save(&dir, "two.npy", &two),
        "--json",
        &json.to_string_lossy(),
        "--plot",
        &plot.to_string_lossy(),
    ]));
    assert!(out.contains("not depthwise separable"), "{out}");
    let report: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&json).unwrap()).unwrap();
    let d = &report[0]["depthwise"];
    assert_eq!(d["exact_multiplier"], 2);
    assert!(d["curve"][0]["relative_error"].as_f64().unwrap() > 0.1);
    assert!(d["curve"][1]["relative_error"].as_f64().unwrap() < 1e-6);
    assert!(std::fs::read_to_string(&plot).unwrap().starts_with("<svg"));
}

#[test]
fn decompose_writes_pairs_that_run_with_conv() {
    let dir = temp_dir("decompose");
    let mut rng = Rng::new(4);
    let w = Tensor::new(&[6, 4, 3, 3], rng.vec(216)).unwrap();
    let wp = save(&dir, "w.npy", &w);
    let bias = save(&dir, "b.npy", &Tensor::new(&[6], rng.vec(6)).unwrap());
    let out_dir = dir.join("ds");
    let out = stdout(&run(&[
        "decompose",
        "--weight",
        &wp,
        "--to",
        "depthwise-separable",
        "--rank",
        "2",
        "--bias",
        &bias,
        "--out",
        &out_dir.to_string_lossy(),
    ]));
    assert!(
        out.contains("predicted") && out.contains("relative output error"),
        "{out}"
    );
    let dwt = read_npy(&out_dir.join("depthwise.npy")).unwrap();
    let pwt = read_npy(&out_dir.join("pointwise.npy")).unwrap();
    assert_eq!(dwt.shape(), &[8, 1, 3, 3]);
    assert_eq!(pwt.shape(), &[6, 8, 1, 1]);
    assert!(out_dir.join("bias.npy").exists());
    // The written files reconstruct the predicted error.
    let rec = depthwise::reconstruct(&dwt, &pwt, 4).unwrap();
    let measured = relative_distance(rec.data(), w.data());
    let predicted: f64 = out
        .split("measured, ")
        .nth(1)
        .and_then(|s| s.split_whitespace().next())
        .unwrap()
        .parse()
        .unwrap();
    assert!(
        (measured - predicted).abs() < 1e-5,
        "{measured} vs {predicted}"
    );
    // The pair runs with `sepconv conv`: depthwise (--groups 4), then pointwise with the bias;
    // the result equals the reconstructed conv.
    let x = save(
        &dir,
        "x.npy",
        &Tensor::new(&[1, 4, 7, 7], rng.vec(196)).unwrap(),
    );
    let s = |p: PathBuf| p.to_string_lossy().into_owned();
    let (mid, y, y_rec) = (
        s(dir.join("mid.npy")),
        s(dir.join("y.npy")),
        s(dir.join("y_rec.npy")),
    );
    stdout(&run(&[
        "conv",
        "--input",
        &x,
        "--weight",
        &s(out_dir.join("depthwise.npy")),
        "--groups",
        "4",
        "--padding",
        "same",
        "--output",
        &mid,
    ]));
    stdout(&run(&[
        "conv",
        "--input",
        &mid,
        "--weight",
        &s(out_dir.join("pointwise.npy")),
        "--bias",
        &bias,
        "--output",
        &y,
    ]));
    let recp = save(&dir, "rec.npy", &rec);
    stdout(&run(&[
        "conv",
        "--input",
        &x,
        "--weight",
        &recp,
        "--bias",
        &bias,
        "--padding",
        "same",
        "--output",
        &y_rec,
    ]));
    let (a, b) = (
        read_npy(Path::new(&y)).unwrap(),
        read_npy(Path::new(&y_rec)).unwrap(),
    );
    common::assert_close(
        a.data(),
        b.data(),
        1e-5,
        "pair via CLI vs reconstructed conv",
    );
    // Spatial, by maximum error.
    let sp = dir.join("sp");
    let out = stdout(&run(&[
        "decompose",
        "--weight",
        &wp,
        "--to",
        "spatial",
        "--max-error",
        "0.5",
        "--out",
        &sp.to_string_lossy(),
    ]));
    assert!(out.contains("spatially separable"));
    assert!(sp.join("vertical.npy").exists() && sp.join("horizontal.npy").exists());
}

#[test]
fn bad_input_is_refused() {
    let dir = temp_dir("bad");
    let mut rng = Rng::new(6);
    let w = save(
        &dir,
        "w.npy",
        &Tensor::new(&[2, 2, 3, 3], rng.vec(36)).unwrap(),
    );
    let flat = save(
        &dir,
        "flat.npy",
        &Tensor::new(&[2, 3, 3], rng.vec(18)).unwrap(),
    );
    let empty = save(
        &dir,
        "empty.npy",
        &Tensor::new(&[0, 2, 3, 3], vec![]).unwrap(),
    );
    let out = dir.join("o").to_string_lossy().into_owned();
    let missing = dir.join("missing.npy").to_string_lossy().into_owned();
    let cases: Vec<(Vec<&str>, &str)> = vec![
        (vec!["analyze", "--weight", &missing], "missing.npy"),
        (vec!["analyze", "--weight", &flat], "4-D"),
        (vec!["analyze", "--weight", &empty], "N (out-channels) is 0"),
        (
            vec![
                "decompose",
                "--weight",
                &w,
                "--to",
                "spatial",
                "--rank",
                "0",
                "--out",
                &out,
            ],
            "--rank",
        ),
        (
            vec![
                "decompose",
                "--weight",
                &w,
                "--to",
                "spatial",
                "--max-error",
                "1.5",
                "--out",
                &out,
            ],
            "(0, 1)",
        ),
        (
            vec![
                "decompose",
                "--weight",
                &w,
                "--to",
                "spatial",
                "--max-error",
                "0",
                "--out",
                &out,
            ],
            "(0, 1)",
        ),
        (
            vec![
                "decompose",
                "--weight",
                &w,
                "--to",
                "rowwise",
                "--rank",
                "1",
                "--out",
                &out,
            ],
            "rowwise",
        ),
        (
            vec!["analyze", "--weight", &w, "--layer", "block2"],
            "checkpoint",
        ),
        (
            vec![
                "cost",
                "--input",
                "15x15",
                "--kernel",
                "3",
                "--filters",
                "2",
            ],
            "HxWxC",
        ),
    ];
    for (args, want) in cases {
        let o = run(&args);
        let stderr = String::from_utf8_lossy(&o.stderr);
        assert_eq!(o.status.code(), Some(2), "{args:?}: {stderr}");
        assert_eq!(stderr.trim_end().lines().count(), 1, "{args:?}: {stderr}");
        assert!(
            stderr.contains(want),
            "{args:?}: {stderr:?} should mention {want:?}"
        );
    }
    assert!(!Path::new(&out).join("vertical.npy").exists());
}
