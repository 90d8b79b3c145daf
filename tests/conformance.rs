//! Every 2-D Conv case of the ONNX conformance data (tests/data/onnx-conv) on the reference
//! kernel and on every fast kernel variant, with each case's own tolerance.

mod common;

use std::path::{Path, PathBuf};

use sepconv::io::npy::read_npy;
use sepconv::kernels::{self, Workspace, reference};
use sepconv::{Conv2dParams, ConvGeometry, Padding, Tensor};
use serde_json::Value;

struct Case {
    name: String,
    params: Conv2dParams,
    x: Tensor,
    w: Tensor,
    b: Option<Tensor>,
    y: Tensor,
    rtol: f64,
    atol: f64,
}

fn ints(v: &Value, key: &str) -> Option<Vec<usize>> {
    v.get(key)?
        .as_array()
        .map(|a| a.iter().map(|x| x.as_u64().unwrap() as usize).collect())
}

fn load_case(dir: &Path) -> Case {
    let meta: Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("case.json")).unwrap()).unwrap();
    let attrs = &meta["attributes"];
    let strides = ints(attrs, "strides").unwrap_or(vec![1, 1]);
    let dilations = ints(attrs, "dilations").unwrap_or(vec![1, 1]);
    let group = attrs.get("group").and_then(|g| g.as_u64()).unwrap_or(1) as usize;
    let padding = match attrs.get("auto_pad").and_then(|a| a.as_str()) {
        Some("SAME_UPPER") => Padding::Same,
        Some("SAME_LOWER") => Padding::SameLower,
        Some("VALID") => Padding::Valid,
        _ => {
            // ONNX order: [top, left, bottom, right].
            let p = ints(attrs, "pads").unwrap_or(vec![0, 0, 0, 0]);
            Padding::Explicit {
                top: p[0],
                left: p[1],
                bottom: p[2],
                right: p[3],
            }
        }
    };
    let file = |io: &Value| -> Option<Tensor> {
        let f = io.get("file")?.as_str()?;
        Some(read_npy(&dir.join(f)).unwrap())
    };
    let inputs = meta["inputs"].as_array().unwrap();
    Case {
        name: dir.file_name().unwrap().to_string_lossy().into_owned(),
        params: Conv2dParams {
            stride: (strides[0], strides[1]),
            dilation: (dilations[0], dilations[1]),
            padding,
            groups: group,
        },
        x: file(&inputs[0]).unwrap(),
        w: file(&inputs[1]).unwrap(),
        b: inputs.get(2).and_then(file),
        y: file(&meta["outputs"][0]).unwrap(),
        rtol: meta["tolerance"]["rtol"].as_f64().unwrap(),
        atol: meta["tolerance"]["atol"].as_f64().unwrap(),
    }
}

fn cases() -> Vec<Case> {
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/data/onnx-conv");
    let mut dirs: Vec<PathBuf> = ["onnx-node", "onnx-pytorch"]
        .iter()
        .flat_map(|s| {
            std::fs::read_dir(root.join(s))
                .unwrap()
                .map(|e| e.unwrap().path())
        })
        .collect();
    dirs.sort();
    dirs.iter().map(|d| load_case(d)).collect()
}

#[track_caller]
fn check(case: &Case, got: &[f32], path: &str) {
    for (i, (&a, &e)) in got.iter().zip(case.y.data()).enumerate() {
        let tol = case.atol + case.rtol * e.abs() as f64;
        assert!(
            (a as f64 - e as f64).abs() <= tol,
            "{} ({path}): element {i}: got {a}, expected {e}",
            case.name
        );
    }
}

#[test]
fn all_2d_conv_cases_are_present() {
    // 6 node cases + 11 PyTorch-exported 2-D cases (1-D and 3-D are skipped; see the README).
    assert_eq!(cases().len(), 17);
}

#[test]
fn reference_matches_onnx() {
    for c in cases() {
        let g =
            ConvGeometry::new(c.x.dims4("x").unwrap(), c.w.dims4("w").unwrap(), &c.params).unwrap();
        assert_eq!(&g.output_shape()[..], c.y.shape(), "{}", c.name);
        let mut y = vec![0.0; g.output_len()];
        reference::conv2d_forward(
            &g,
            c.x.data(),
            c.w.data(),
            c.b.as_ref().map(|b| b.data()),
            &mut y,
        );
        check(&c, &y, "reference");
    }
}

#[test]
fn fast_kernels_match_onnx() {
    for c in cases() {
        let g =
            ConvGeometry::new(c.x.dims4("x").unwrap(), c.w.dims4("w").unwrap(), &c.params).unwrap();
        for exec in common::execs() {
            let mut y = vec![f32::NAN; g.output_len()];
            kernels::conv2d_forward(
                exec,
                &g,
                c.x.data(),
                c.w.data(),
                c.b.as_ref().map(|b| b.data()),
                &mut y,
                &mut Workspace::new(),
            )
            .unwrap();
            check(&c, &y, &format!("{exec:?}"));
        }
    }
}

#[test]
fn public_api_matches_onnx() {
    for c in cases() {
        let y = sepconv::conv2d(&c.x, &c.w, c.b.as_ref(), &c.params).unwrap();
        check(&c, y.data(), "conv2d");
    }
}
