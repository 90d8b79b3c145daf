//! `sepconv conv` end to end: results equal the reference kernel, and every kind of bad input
//! is refused with one line naming the file, exit code 2, and no output file written.

mod common;

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use common::{Rng, assert_close};
use sepconv::io::npy::{npy_bytes, read_npy};
use sepconv::kernels::reference;
use sepconv::{Conv2dParams, ConvGeometry, Padding, Tensor};

fn bin() -> Command {
    Command::new(env!("CARGO_BIN_EXE_sepconv"))
}

/// A fresh empty folder under the system temp dir.
fn temp_dir(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("sepconv-cli-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

fn write(dir: &Path, name: &str, t: &Tensor) -> PathBuf {
    let p = dir.join(name);
    std::fs::write(&p, npy_bytes(t)).unwrap();
    p
}

fn random(shape: &[usize], rng: &mut Rng) -> Tensor {
    Tensor::new(shape, rng.vec(shape.iter().product())).unwrap()
}

fn run(args: &[&str]) -> Output {
    bin().args(args).output().unwrap()
}

#[test]
fn conv_with_gradients_matches_reference() {
    let dir = temp_dir("ok");
    let mut rng = Rng::new(3);
    let (x, w, b, gy) = (
        random(&[2, 4, 9, 8], &mut rng),
        random(&[6, 2, 3, 2], &mut rng),
        random(&[6], &mut rng),
        random(&[2, 6, 5, 4], &mut rng),
    );
    let params = Conv2dParams {
        stride: (2, 2),
        dilation: (1, 2),
        padding: Padding::SameLower,
        groups: 2,
    };
    let g = ConvGeometry::new([2, 4, 9, 8], [6, 2, 3, 2], &params).unwrap();
    assert_eq!(g.output_shape(), [2, 6, 5, 4]);
    let p = |n: &str, t: &Tensor| write(&dir, n, t).to_string_lossy().into_owned();
    let (xp, wp, bp, gyp) = (
        p("x.npy", &x),
        p("w.npy", &w),
        p("b.npy", &b),
        p("gy.npy", &gy),
    );
    let out = |n: &str| dir.join(n).to_string_lossy().into_owned();
    let mut y = vec![0.0; g.output_len()];
    let mut gx = vec![0.0; g.input_len()];
    let mut gw = vec![0.0; g.weight_len()];
    let mut gb = vec![0.0; 6];
    reference::conv2d_forward(&g, x.data(), w.data(), Some(b.data()), &mut y);
    reference::conv2d_grad_input(&g, gy.data(), w.data(), &mut gx);
    reference::conv2d_grad_weight(&g, x.data(), gy.data(), &mut gw);
    reference::conv2d_grad_bias(&g, gy.data(), &mut gb);
    // The default instruction set, then each one by --isa (a CPU without one refuses it).
    let available: Vec<String> = sepconv::Isa::available()
        .iter()
        .map(|i| i.to_string())
        .collect();
    let (yo, gxo, gwo, gbo) = (out("y.npy"), out("gx.npy"), out("gw.npy"), out("gb.npy"));
    for isa in ["", "avx512", "avx2", "portable"] {
        let isa_args: &[&str] = if isa.is_empty() { &[] } else { &["--isa", isa] };
        let mut args: Vec<&str> = isa_args.to_vec();
        args.extend_from_slice(&[
            "--threads",
            "2",
            "conv",
            "--input",
            &xp,
            "--weight",
            &wp,
            "--bias",
            &bp,
            "--stride",
            "2",
            "--dilation",
            "1,2",
            "--padding",
            "same-lower",
            "--groups",
            "2",
            "--output",
            &yo,
            "--grad-output",
            &gyp,
            "--grad-input",
            &gxo,
            "--grad-weight",
            &gwo,
            "--grad-bias",
            &gbo,
            "--stats",
        ]);
        let o = run(&args);
        if !isa.is_empty() && !available.iter().any(|a| a == isa) {
            let err = String::from_utf8_lossy(&o.stderr);
            assert_eq!(o.status.code(), Some(2), "{isa}: {err}");
            assert!(err.contains("--isa") && err.lines().count() == 1, "{err}");
            continue;
        }
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
        let stdout = String::from_utf8_lossy(&o.stdout);
        assert!(
            stdout.contains("MACs nominal") && stdout.contains("MACs executed"),
            "{stdout}"
        );
        for (name, want) in [
            ("y.npy", &y),
            ("gx.npy", &gx),
            ("gw.npy", &gw),
            ("gb.npy", &gb),
        ] {
            let got = read_npy(&dir.join(name)).unwrap();
            assert_close(got.data(), want, 1e-5, &format!("{name} {isa}"));
        }
    }
}

/// Raw .npy bytes with a custom header.
fn raw_npy(dict: &str, data: &[u8]) -> Vec<u8> {
    let mut b = b"\x93NUMPY\x01\x00".to_vec();
    b.extend_from_slice(&(dict.len() as u16).to_le_bytes());
    b.extend_from_slice(dict.as_bytes());
    b.extend_from_slice(data);
    b
}

#[test]
fn bad_inputs_are_refused_cleanly() {
    let dir = temp_dir("bad");
    let mut rng = Rng::new(4);
    let x = write(&dir, "x.npy", &random(&[1, 2, 5, 5], &mut rng));
    let w = write(&dir, "w.npy", &random(&[3, 2, 3, 3], &mut rng));
    let w_bad_ch = write(&dir, "w_bad_ch.npy", &random(&[3, 4, 3, 3], &mut rng));
    let w_big = write(&dir, "w_big.npy", &random(&[3, 2, 7, 7], &mut rng));
    let x3d = write(&dir, "x3d.npy", &random(&[2, 5, 5], &mut rng));
    let b_bad = write(&dir, "b_bad.npy", &random(&[4], &mut rng));
    let gy_bad = write(&dir, "gy_bad.npy", &random(&[1, 3, 5, 5], &mut rng));
    let f64_file = dir.join("f64.npy");
    std::fs::write(
        &f64_file,
        raw_npy(
            "{'descr': '<f8', 'fortran_order': False, 'shape': (1, 2, 5, 5), }",
            &[0; 400],
        ),
    )
    .unwrap();
    let fortran = dir.join("fortran.npy");
    std::fs::write(
        &fortran,
        raw_npy(
            "{'descr': '<f4', 'fortran_order': True, 'shape': (1, 2, 5, 5), }",
            &[0; 200],
        ),
    )
    .unwrap();
    let truncated = dir.join("truncated.npy");
    std::fs::write(
        &truncated,
        raw_npy(
            "{'descr': '<f4', 'fortran_order': False, 'shape': (1, 2, 5, 5), }",
            &[0; 100],
        ),
    )
    .unwrap();
    let header = dir.join("header.npy");
    let mut hb = raw_npy(
        "{'descr': '<f4', 'fortran_order': False, 'shape': (1, 2, 5, 5), }",
        &[],
    );
    hb.truncate(30);
    std::fs::write(&header, hb).unwrap();
    let malformed = dir.join("malformed.npy");
    std::fs::write(
        &malformed,
        raw_npy(
            "{'descr': '<f4', 'fortran_order': Maybe, 'shape': (1, 2, 5, 5), }",
            &[0; 200],
        ),
    )
    .unwrap();
    let missing = dir.join("missing.npy");

    let s = |p: &Path| p.to_string_lossy().into_owned();
    let y = dir.join("y.npy");
    let cases: Vec<(Vec<String>, &str)> = vec![
        (
            vec!["--input".into(), s(&f64_file), "--weight".into(), s(&w)],
            "float64",
        ),
        (
            vec!["--input".into(), s(&fortran), "--weight".into(), s(&w)],
            "Fortran",
        ),
        (
            vec!["--input".into(), s(&truncated), "--weight".into(), s(&w)],
            "truncated",
        ),
        (
            vec!["--input".into(), s(&header), "--weight".into(), s(&w)],
            "header",
        ),
        (
            vec!["--input".into(), s(&malformed), "--weight".into(), s(&w)],
            "malformed",
        ),
        (
            vec!["--input".into(), s(&missing), "--weight".into(), s(&w)],
            "no such file",
        ),
        (
            vec!["--input".into(), s(&x3d), "--weight".into(), s(&w)],
            "4-D",
        ),
        (
            vec!["--input".into(), s(&x), "--weight".into(), s(&w_bad_ch)],
            "in-channels",
        ),
        (
            vec!["--input".into(), s(&x), "--weight".into(), s(&w_big)],
            "larger than the padded input",
        ),
        (
            vec![
                "--input".into(),
                s(&x),
                "--weight".into(),
                s(&w),
                "--groups".into(),
                "3".into(),
            ],
            "divisible",
        ),
        (
            vec![
                "--input".into(),
                s(&x),
                "--weight".into(),
                s(&w),
                "--bias".into(),
                s(&b_bad),
            ],
            "bias",
        ),
        (
            vec![
                "--input".into(),
                s(&x),
                "--weight".into(),
                s(&w),
                "--stride".into(),
                "0".into(),
            ],
            "--stride",
        ),
        (
            vec![
                "--input".into(),
                s(&x),
                "--weight".into(),
                s(&w),
                "--padding".into(),
                "1,2,3".into(),
            ],
            "padding",
        ),
        (
            vec![
                "--input".into(),
                s(&x),
                "--weight".into(),
                s(&w),
                "--grad-output".into(),
                s(&gy_bad),
                "--grad-input".into(),
                s(&dir.join("gx.npy")),
                "--grad-weight".into(),
                s(&dir.join("gw.npy")),
            ],
            "grad-output",
        ),
    ];
    for (mut args, want) in cases {
        args.splice(0..0, ["conv".to_string()]);
        args.extend(["--output".to_string(), s(&y)]);
        let o = bin().args(&args).output().unwrap();
        let stderr = String::from_utf8_lossy(&o.stderr);
        assert_eq!(o.status.code(), Some(2), "{args:?}: {stderr}");
        assert!(
            stderr.contains(want),
            "{args:?}: stderr {stderr:?} should mention {want:?}"
        );
        assert!(!stderr.contains("panicked"), "{args:?}: {stderr}");
        assert!(
            !y.exists() && !dir.join("gx.npy").exists(),
            "{args:?} left an output file"
        );
        let names: Vec<_> = std::fs::read_dir(&dir)
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert!(
            names.iter().all(|n| !n.to_string_lossy().contains(".tmp-")),
            "{args:?} left a temporary file"
        );
    }
    // A file error names the file.
    let o = run(&[
        "conv",
        "--input",
        &s(&fortran),
        "--weight",
        &s(&w),
        "--output",
        &s(&y),
    ]);
    let stderr = String::from_utf8_lossy(&o.stderr);
    assert!(stderr.contains("fortran.npy"), "{stderr}");
    assert_eq!(stderr.trim_end().lines().count(), 1, "one line: {stderr}");
}

#[test]
fn output_into_missing_folder_is_refused() {
    let dir = temp_dir("nofolder");
    let mut rng = Rng::new(5);
    let x = write(&dir, "x.npy", &random(&[1, 1, 4, 4], &mut rng));
    let w = write(&dir, "w.npy", &random(&[1, 1, 3, 3], &mut rng));
    let y = dir.join("nope/y.npy");
    let o = run(&[
        "conv",
        "--input",
        &x.to_string_lossy(),
        "--weight",
        &w.to_string_lossy(),
        "--output",
        &y.to_string_lossy(),
    ]);
    assert_eq!(o.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&o.stderr).contains("does not exist"));
}
