//! `sepconv conv`: one convolution (and optionally its backward pass) on .npy files.

use std::path::{Path, PathBuf};
use std::time::Instant;

use sepconv::io::AtomicFiles;
use sepconv::io::npy::{npy_bytes, read_npy, read_npy_4d};
use sepconv::kernels::{self, Workspace};
use sepconv::{Conv2dParams, ConvCost, ConvGeometry, Error, Exec, Padding, Result, Tensor};

/// Apply one convolution (and its backward pass) to .npy arrays, for cross-checking frameworks.
///
/// Inputs are float32 C-order .npy arrays: NCHW input, OIHW weight.
///
/// With --grad-output it also runs the backward pass and writes the gradients. All outputs are
/// written only after everything succeeded, each under a temporary name renamed into place.
#[derive(clap::Args)]
#[command(
    after_help = "Example (a 3×3 'same' depthwise convolution with multiplier 2 on 4 channels):\n  \
    sepconv conv --input x.npy --weight w.npy --groups 4 --padding same --output y.npy --stats"
)]
pub struct Args {
    /// Input activation [batch, channels, height, width].
    #[arg(long, value_name = "X.npy")]
    input: PathBuf,
    /// Weight [out_channels, in_channels / groups, kh, kw] (PyTorch/ONNX layout).
    #[arg(long, value_name = "W.npy")]
    weight: PathBuf,
    /// Bias [out_channels].
    #[arg(long, value_name = "B.npy")]
    bias: Option<PathBuf>,
    /// Stride: S or SH,SW.
    #[arg(long, default_value = "1", value_name = "S|SH,SW",
          value_parser = |s: &str| sepconv::geometry::parse_pair(s, "--stride"))]
    stride: (usize, usize),
    /// Dilation: D or DH,DW.
    #[arg(long, default_value = "1", value_name = "D|DH,DW",
          value_parser = |s: &str| sepconv::geometry::parse_pair(s, "--dilation"))]
    dilation: (usize, usize),
    /// Padding: valid, same (TF/Keras, ONNX SAME_UPPER), same-lower (ONNX SAME_LOWER), P, PH,PW
    /// or T,B,L,R.
    #[arg(long, default_value = "valid", value_name = "PADDING")]
    padding: Padding,
    /// Channel groups (in-channels for depthwise).
    #[arg(long, default_value_t = 1, value_name = "G")]
    groups: usize,
    /// Where to write the output [batch, out_channels, out_h, out_w].
    #[arg(long, value_name = "Y.npy")]
    output: PathBuf,
    /// Gradient of the loss with respect to the output; enables the backward pass.
    #[arg(long, value_name = "GY.npy", requires_all = ["grad_input", "grad_weight"])]
    grad_output: Option<PathBuf>,
    /// Where to write the gradient with respect to the input.
    #[arg(long, value_name = "GX.npy", requires = "grad_output")]
    grad_input: Option<PathBuf>,
    /// Where to write the gradient with respect to the weight.
    #[arg(long, value_name = "GW.npy", requires = "grad_output")]
    grad_weight: Option<PathBuf>,
    /// Where to write the gradient with respect to the bias.
    #[arg(long, value_name = "GB.npy", requires = "grad_output")]
    grad_bias: Option<PathBuf>,
    /// Print the op's cost (nominal and executed MACs) and the time it took.
    #[arg(long)]
    stats: bool,
}

fn shape_error(path: &Path, msg: String) -> Error {
    Error::file(path, msg)
}

pub fn run(exec: Exec, a: Args) -> Result<()> {
    let x = read_npy_4d(&a.input, "input")?;
    let w = read_npy_4d(&a.weight, "weight")?;
    let params = Conv2dParams {
        stride: a.stride,
        dilation: a.dilation,
        padding: a.padding,
        groups: a.groups,
    };
    let g = ConvGeometry::new(x.dims4("input")?, w.dims4("weight")?, &params).map_err(|e| {
        Error::invalid(format!(
            "{} {:?} and {} {:?} do not fit: {e}",
            a.input.display(),
            x.shape(),
            a.weight.display(),
            w.shape()
        ))
    })?;
    let bias = match &a.bias {
        Some(p) => {
            let b = read_npy(p)?;
            if b.shape() != [g.out_channels] {
                return Err(shape_error(
                    p,
                    format!(
                        "bias must have shape [{}] (one value per output channel), got {:?}",
                        g.out_channels,
                        b.shape()
                    ),
                ));
            }
            Some(b)
        }
        None => None,
    };
    let gy = match &a.grad_output {
        Some(p) => {
            let t = read_npy(p)?;
            if t.shape() != g.output_shape() {
                return Err(shape_error(
                    p,
                    format!(
                        "grad-output must have the output's shape {:?}, got {:?}",
                        g.output_shape(),
                        t.shape()
                    ),
                ));
            }
            Some(t)
        }
        None => None,
    };

    let mut ws = Workspace::new();
    let mut y = Tensor::zeros(&g.output_shape())?;
    let t0 = Instant::now();
    kernels::conv2d_forward(
        exec,
        &g,
        x.data(),
        w.data(),
        bias.as_ref().map(|b| b.data()),
        y.data_mut(),
        &mut ws,
    )?;
    let forward_s = t0.elapsed().as_secs_f64();

    let mut files = AtomicFiles::new();
    files.write(&a.output, &npy_bytes(&y))?;
    let mut backward_s = None;
    if let Some(gy) = &gy {
        let t1 = Instant::now();
        let mut gx = Tensor::zeros(x.shape())?;
        let mut gw = Tensor::zeros(w.shape())?;
        let mut gb = Tensor::zeros(&[g.out_channels])?;
        kernels::conv2d_backward(
            exec,
            &g,
            x.data(),
            gy.data(),
            w.data(),
            Some(gx.data_mut()),
            gw.data_mut(),
            Some(gb.data_mut()),
            &mut ws,
        )?;
        backward_s = Some(t1.elapsed().as_secs_f64());
        // clap guarantees these are present with --grad-output.
        if let Some(p) = &a.grad_input {
            files.write(p, &npy_bytes(&gx))?;
        }
        if let Some(p) = &a.grad_weight {
            files.write(p, &npy_bytes(&gw))?;
        }
        if let Some(p) = &a.grad_bias {
            files.write(p, &npy_bytes(&gb))?;
        }
    }
    files.commit()?;

    if a.stats {
        let c = ConvCost::of(&g, bias.is_some());
        println!(
            "conv {:?} * {:?} -> {:?}  stride {:?} dilation {:?} padding {} (pads t{} b{} l{} r{}) groups {}",
            g.input_shape(),
            g.weight_shape(),
            g.output_shape(),
            params.stride,
            params.dilation,
            params.padding,
            g.pad_top,
            g.pad_bottom,
            g.pad_left,
            g.pad_right,
            g.groups
        );
        // As the forward ran: a call too small to split runs on one thread.
        let ran = exec.for_work(g.macs());
        println!(
            "algorithm {:?}, {} thread(s), {}",
            kernels::ConvAlgorithm::choose(ran, &g),
            ran.threads(),
            ran.isa()
        );
        println!(
            "forward:     {:>14} MACs nominal, {:>14} MACs executed, {:>10} bias adds, {:9.3} ms, {:7.2} GMAC/s",
            c.forward_macs_nominal,
            c.forward_macs_executed,
            c.bias_adds,
            forward_s * 1e3,
            c.forward_macs_nominal as f64 / forward_s / 1e9
        );
        if let Some(bs) = backward_s {
            println!(
                "grad-input:  {:>14} MACs nominal, {:>14} MACs executed",
                c.grad_input_macs_nominal, c.grad_input_macs_executed
            );
            println!(
                "grad-weight: {:>14} MACs nominal, {:>14} MACs executed",
                c.grad_weight_macs_nominal, c.grad_weight_macs_executed
            );
            println!(
                "backward:    {:9.3} ms for both products and grad-bias, {:7.2} GMAC/s",
                bs * 1e3,
                (c.grad_input_macs_nominal + c.grad_weight_macs_nominal) as f64 / bs / 1e9
            );
        }
        println!(
            "params {}, activations {} bytes (f32 input + output)",
            c.params,
            c.activation_bytes()
        );
    }
    Ok(())
}
