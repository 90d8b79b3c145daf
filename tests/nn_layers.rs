//! Layers against hand-computed values, and a finite-difference gradient check of a small
//! network containing every layer type.

mod common;

use sepconv::nn::{ModelSpec, Network};
use sepconv::rng::Rng;
use sepconv::train::loss::softmax_cross_entropy;
use sepconv::{Exec, Workspace};

fn net(toml_layers: &str, input: [usize; 3], seed: u64) -> Network {
    let text = format!("name = \"t\"\ninput = {input:?}\n{toml_layers}");
    Network::new(&ModelSpec::parse(&text, "test").unwrap(), seed).unwrap()
}

/// Two threads splitting every call (the layers' shapes here are small).
fn exec() -> Exec {
    common::exec(2)
}

#[test]
fn batchnorm_training_and_evaluation_modes() {
    let mut n = net(
        "[[layers]]\ntype = \"batchnorm2d\"\nmomentum = 0.1\neps = 1e-5\n",
        [2, 1, 2],
        0,
    );
    // Batch of 2 images, 2 channels, 1×2 pixels. Channel 0 values: 1, 2, 3, 4; channel 1: 10 ×4.
    let x = [1.0, 2.0, 10.0, 10.0, 3.0, 4.0, 10.0, 10.0];
    let mut rng = Rng::new(0);
    let y = n.forward(exec(), &x, 2, true, &mut rng).unwrap().to_vec();
    let (mean, var) = (2.5f32, 1.25f32); // biased variance of 1..4
    for (i, &xi) in [1.0f32, 2.0, 3.0, 4.0].iter().enumerate() {
        let want = (xi - mean) / (var + 1e-5).sqrt();
        let at = [0, 1, 4, 5][i];
        assert!((y[at] - want).abs() < 1e-5, "{} vs {want}", y[at]);
    }
    // A constant channel normalizes to 0 (not NaN).
    assert!(y[2].abs() < 1e-3 && y[3].abs() < 1e-3);
    // Running statistics: momentum 0.1, unbiased variance (1.25 · 4/3).
    let layer = &mut n.layers_mut()[0];
    let bufs = layer.module.buffers();
    assert!((bufs[0].value[0] - 0.25).abs() < 1e-6);
    assert!((bufs[1].value[0] - (0.9 + 0.1 * 1.25 * 4.0 / 3.0)).abs() < 1e-6);
    assert!((bufs[0].value[1] - 1.0).abs() < 1e-6);
    // Evaluation uses the running statistics.
    let y = n.forward(exec(), &x, 2, false, &mut rng).unwrap();
    let rv = 0.9 + 0.1 * 1.25 * 4.0 / 3.0;
    assert!((y[0] - (1.0 - 0.25) / (rv + 1e-5f32).sqrt()).abs() < 1e-5);
}

#[test]
fn maxpool_routes_gradient_to_first_maximum_on_ties() {
    let mut n = net(
        "[[layers]]\ntype = \"maxpool2d\"\nkernel = 2\n",
        [1, 2, 4],
        0,
    );
    // Two 2×2 windows: [5, 5 / 1, 5] (a three-way tie) and [0, 7 / 7, 2].
    let x = [5.0, 5.0, 0.0, 7.0, 1.0, 5.0, 7.0, 2.0];
    let mut rng = Rng::new(0);
    let y = n.forward(exec(), &x, 1, true, &mut rng).unwrap().to_vec();
    assert_eq!(y, vec![5.0, 7.0]);
    n.backward(exec(), &[1.0, 2.0], 1, &mut rng).unwrap();
    // The input gradient of the first layer is not computed by a network; check through a
    // layer in front of the pool instead: a ReLU passes gradients through for positive inputs.
    let mut n = net(
        "[[layers]]\ntype = \"relu\"\n[[layers]]\ntype = \"maxpool2d\"\nkernel = 2\n[[layers]]\ntype = \"flatten\"\n[[layers]]\ntype = \"linear\"\nout_features = 1\nbias = false\n",
        [1, 2, 4],
        0,
    );
    let w: Vec<f32> = n.params_mut()[0].1.value.clone();
    n.forward(exec(), &x, 1, true, &mut rng).unwrap();
    n.backward(exec(), &[1.0], 1, &mut rng).unwrap();
    // Linear weight gradient = pooled values; pooling gradient reaches only the first maxima.
    let gw = &n.params_mut()[0].1.grad;
    assert_eq!(gw, &vec![5.0, 7.0]);
    let _ = w;
}

#[test]
fn dropout_scales_kept_values_and_masks_gradients() {
    let mut n = net(
        "[[layers]]\ntype = \"dropout\"\np = 0.25\n",
        [1, 100, 100],
        0,
    );
    let x = vec![1.0f32; 10_000];
    let mut rng = Rng::new(3);
    let y = n.forward(exec(), &x, 1, true, &mut rng).unwrap().to_vec();
    let kept = y.iter().filter(|&&v| v != 0.0).count();
    assert!(y.iter().all(|&v| v == 0.0 || (v - 1.0 / 0.75).abs() < 1e-6));
    assert!((kept as f64 / 1e4 - 0.75).abs() < 0.02, "kept {kept}");
    let mean: f64 = y.iter().map(|&v| v as f64).sum::<f64>() / 1e4;
    assert!((mean - 1.0).abs() < 0.03);
    // Evaluation mode is the identity.
    let y = n.forward(exec(), &x, 1, false, &mut rng).unwrap();
    assert!(y.iter().all(|&v| v == 1.0));
}

#[test]
fn linear_matches_naive_product() {
    let mut n = net(
        "[[layers]]\ntype = \"flatten\"\n[[layers]]\ntype = \"linear\"\nout_features = 3\n",
        [2, 1, 2],
        1,
    );
    let x: Vec<f32> = (0..8).map(|i| i as f32 * 0.5 - 1.0).collect(); // batch 2 × 4 features
    let (w, b) = {
        let p = n.params_mut();
        (p[0].1.value.clone(), p[1].1.value.clone())
    };
    let mut rng = Rng::new(0);
    let y = n.forward(exec(), &x, 2, false, &mut rng).unwrap();
    for bi in 0..2 {
        for o in 0..3 {
            let want: f32 = b[o] + (0..4).map(|i| x[bi * 4 + i] * w[o * 4 + i]).sum::<f32>();
            assert!((y[bi * 3 + o] - want).abs() < 1e-5);
        }
    }
}

/// Every layer type in one network; all parameter gradients against central differences of
/// the loss (training mode, the same dropout mask on every evaluation).
#[test]
fn whole_network_gradients_match_finite_differences() {
    let layers = r#"
[[layers]]
type = "conv2d"
out_channels = 3
kernel = 3
padding = 1
[[layers]]
type = "batchnorm2d"
[[layers]]
type = "relu"
[[layers]]
type = "maxpool2d"
kernel = 2
[[layers]]
type = "depthwise_separable_conv2d"
out_channels = 4
kernel = 3
padding = "same"
multiplier = 2
[[layers]]
type = "spatially_separable_conv2d"
out_channels = 4
kernel = [3, 2]
padding = "same"
mid_channels = 2
[[layers]]
type = "dropout"
p = 0.2
[[layers]]
type = "global_avg_pool"
[[layers]]
type = "flatten"
[[layers]]
type = "linear"
out_features = 3
"#;
    let mut n = net(layers, [2, 8, 6], 5);
    let batch = 3;
    let mut data = common::Rng::new(9);
    let x = data.vec(batch * 2 * 8 * 6);
    let labels = [0u8, 2, 1];
    let loss_of = |n: &mut Network| -> f64 {
        let mut rng = Rng::new(77);
        let logits = n
            .forward(Exec::new(1), &x, batch, true, &mut rng)
            .unwrap()
            .to_vec();
        let mut g = vec![0.0; logits.len()];
        softmax_cross_entropy(&logits, &labels, 3, &mut g).0
    };
    // Analytic gradients.
    let mut rng = Rng::new(77);
    let logits = n
        .forward(Exec::new(1), &x, batch, true, &mut rng)
        .unwrap()
        .to_vec();
    let mut g = vec![0.0; logits.len()];
    softmax_cross_entropy(&logits, &labels, 3, &mut g);
    n.backward(Exec::new(1), &g, batch, &mut rng).unwrap();
    let grads: Vec<(String, Vec<f32>)> = n
        .params_mut()
        .iter()
        .map(|(l, p)| (format!("{l}.{}", p.name), p.grad.clone()))
        .collect();
    let h = 1e-2f32;
    let mut checked = 0;
    for (pi, (name, grad)) in grads.iter().enumerate() {
        let len = grad.len();
        for k in (0..len).step_by((len / 6).max(1)) {
            let orig = n.params_mut()[pi].1.value[k];
            n.params_mut()[pi].1.value[k] = orig + h;
            let up = loss_of(&mut n);
            n.params_mut()[pi].1.value[k] = orig - h;
            let down = loss_of(&mut n);
            n.params_mut()[pi].1.value[k] = orig;
            let num = (up - down) / (2.0 * h as f64);
            let err = (grad[k] as f64 - num).abs();
            assert!(
                err <= 2e-3 + 2e-2 * num.abs(),
                "{name}[{k}]: analytic {} numeric {num}",
                grad[k]
            );
            checked += 1;
        }
    }
    assert!(checked > 40, "checked {checked} gradients");
    let _ = Workspace::new();
}

/// A Flatten shares its input's buffer (the network runs nothing for it): as the last layer
/// the network's output and gradients are those of the network without it, and as the first
/// (`linear_matches_naive_product`) the input is read through it.
#[test]
fn flatten_as_the_last_layer_changes_nothing() {
    let conv = "[[layers]]\ntype = \"conv2d\"\nout_channels = 2\nkernel = 3\npadding = 1\n";
    let mut plain = net(conv, [1, 4, 5], 3);
    let mut flat = net(
        &format!("{conv}[[layers]]\ntype = \"flatten\"\n"),
        [1, 4, 5],
        3,
    );
    assert!(flat.is_view(1) && !plain.is_view(0));
    let batch = 2;
    let x = common::Rng::new(4).vec(batch * 20);
    let g = common::Rng::new(5).vec(batch * 40);
    let run = |n: &mut Network| {
        let mut rng = Rng::new(0);
        let y = n
            .forward(exec(), &x, batch, true, &mut rng)
            .unwrap()
            .to_vec();
        n.backward(exec(), &g, batch, &mut rng).unwrap();
        let grads: Vec<Vec<f32>> = n.params_mut().iter().map(|(_, p)| p.grad.clone()).collect();
        (y, grads)
    };
    assert_eq!(run(&mut plain), run(&mut flat));
}

/// BatchNorm, ReLU and a 2 × 2 max pool run as one layer (each plane through a scratch plane)
/// give exactly what the three layers give one by one (kept apart here by a dropout with
/// p = 0, an exact identity): outputs in training and evaluation, every parameter gradient,
/// on planes with an odd last row and column that the pool leaves out.
#[test]
fn batchnorm_relu_maxpool_fused_equals_the_layers_one_by_one() {
    let head = "[[layers]]\ntype = \"conv2d\"\nout_channels = 3\nkernel = 3\npadding = 1\n[[layers]]\ntype = \"batchnorm2d\"\n[[layers]]\ntype = \"relu\"\n";
    let tail = "[[layers]]\ntype = \"maxpool2d\"\nkernel = 2\n[[layers]]\ntype = \"flatten\"\n[[layers]]\ntype = \"linear\"\nout_features = 2\n";
    let apart = "[[layers]]\ntype = \"dropout\"\np = 0.0\n";
    for (h, w) in [(6, 8), (7, 9), (23, 25)] {
        let mut fused = net(&format!("{head}{tail}"), [2, h, w], 11);
        let mut layered = net(&format!("{head}{apart}{tail}"), [2, h, w], 11);
        assert!(fused.is_fused(2) && fused.is_fused(3));
        assert_eq!(
            (fused.runs_inside(3), fused.runs_inside(1)),
            (Some(1), None)
        );
        assert!(layered.is_fused(2) && !layered.is_fused(4));
        let batch = 3;
        let x = common::Rng::new(6).vec(batch * 2 * h * w);
        let g = common::Rng::new(7).vec(batch * 2);
        let run = |n: &mut Network| {
            let mut rng = Rng::new(0);
            let mut out = Vec::new();
            for train in [true, false] {
                out.push(
                    n.forward(exec(), &x, batch, train, &mut rng)
                        .unwrap()
                        .to_vec(),
                );
            }
            n.forward(exec(), &x, batch, true, &mut rng).unwrap();
            n.backward(exec(), &g, batch, &mut rng).unwrap();
            let grads: Vec<Vec<f32>> = n.params_mut().iter().map(|(_, p)| p.grad.clone()).collect();
            (out, grads)
        };
        assert_eq!(run(&mut fused), run(&mut layered), "{h}×{w}");
    }
}
