//! `sepconv cost`: the textbook's cost arithmetic, one layer's variants side by side, or a
//! whole network's per-layer costs.

use sepconv::cost::{ConvCost, depthwise_separable_ratio};
use sepconv::geometry::parse_pair;
use sepconv::nn::{ModelSpec, Network};
use sepconv::{Conv2dParams, ConvGeometry, ConvPair, Error, Exec, Padding, Result};
use serde::Serialize;

/// Count what convolutions cost: the textbook's examples, one layer's variants, or a network.
///
/// MACs (multiply-accumulates; FLOPs = 2 × MACs), parameters and activation bytes.
///
/// With no arguments: the textbook's worked examples (depthwise separable on a 15×15 RGB input;
/// Sobel as a spatially separable kernel), derived step by step, with two corrections.
/// With --input/--kernel/--filters: one layer as standard, spatially separable and depthwise
/// separable convolutions side by side. With --model: a network's per-layer costs.
#[derive(clap::Args)]
#[command(
    after_help = "Examples:\n  sepconv cost\n  sepconv cost --input 112x112x32 --kernel 3x3 --filters 64 --padding same\n  \
    sepconv cost --model mnist-ref-ds"
)]
pub struct Args {
    /// Input as HxWxC (height × width × channels), e.g. 15x15x3.
    #[arg(long, value_name = "HxWxC", requires_all = ["kernel", "filters"], conflicts_with = "model")]
    input: Option<String>,
    /// Kernel size KHxKW (or K for square).
    #[arg(long, value_name = "KHxKW")]
    kernel: Option<String>,
    /// Number of filters N (output channels).
    #[arg(long, value_name = "N")]
    filters: Option<usize>,
    /// Stride S or SH,SW.
    #[arg(long, default_value = "1", value_parser = |s: &str| parse_pair(s, "--stride"))]
    stride: (usize, usize),
    /// Dilation D or DH,DW.
    #[arg(long, default_value = "1", value_parser = |s: &str| parse_pair(s, "--dilation"))]
    dilation: (usize, usize),
    /// Padding: valid, same, same-lower, P, PH,PW or T,B,L,R.
    #[arg(long, default_value = "valid")]
    padding: Padding,
    /// Depth multiplier K of the depthwise-separable variant.
    #[arg(long, default_value_t = 1, value_name = "K")]
    depth_multiplier: usize,
    /// Middle channels R of the spatially separable variant [default: min(C, N)].
    #[arg(long, value_name = "R")]
    mid: Option<usize>,
    /// Images per batch.
    #[arg(long, default_value_t = 1)]
    batch: usize,
    /// A network (preset or TOML spec): per-layer costs.
    #[arg(long, value_name = "PRESET|FILE")]
    model: Option<String>,
    /// Print JSON instead of tables.
    #[arg(long)]
    json: bool,
}

/// 45630 → "45,630".
pub fn thousands(v: u64) -> String {
    let s = v.to_string();
    let mut out = String::new();
    for (i, c) in s.chars().enumerate() {
        if i > 0 && (s.len() - i).is_multiple_of(3) {
            out.push(',');
        }
        out.push(c);
    }
    out
}

fn parse_hwc(s: &str) -> Result<[usize; 3]> {
    let v: Vec<usize> = s
        .split(['x', 'X', '×'])
        .map(|p| p.trim().parse::<usize>())
        .collect::<std::result::Result<_, _>>()
        .map_err(|_| Error::invalid(format!("--input '{s}' must be HxWxC, e.g. 15x15x3")))?;
    match v[..] {
        [h, w, c] if h > 0 && w > 0 && c > 0 => Ok([h, w, c]),
        _ => Err(Error::invalid(format!(
            "--input '{s}' must be HxWxC with sizes >= 1, e.g. 15x15x3"
        ))),
    }
}

fn parse_kernel(s: &str) -> Result<(usize, usize)> {
    let v: Vec<usize> = s
        .split(['x', 'X', '×'])
        .map(|p| p.trim().parse::<usize>())
        .collect::<std::result::Result<_, _>>()
        .map_err(|_| Error::invalid(format!("--kernel '{s}' must be KHxKW or K, e.g. 3x3")))?;
    match v[..] {
        [k] if k > 0 => Ok((k, k)),
        [h, w] if h > 0 && w > 0 => Ok((h, w)),
        _ => Err(Error::invalid(format!(
            "--kernel '{s}' must be KHxKW or K with sizes >= 1"
        ))),
    }
}

pub fn run(_exec: Exec, a: Args) -> Result<()> {
    if let Some(model) = &a.model {
        return network(model, a.json);
    }
    match (&a.input, &a.kernel, a.filters) {
        (Some(i), Some(k), Some(n)) => layer(&a, i, k, n),
        (None, None, None) => textbook(a.json),
        _ => Err(Error::invalid(
            "give --input, --kernel and --filters together (or none for the textbook examples)",
        )),
    }
}

#[derive(Serialize)]
struct Variant {
    name: String,
    nominal_macs: u64,
    executed_macs: u64,
    flops: u64,
    params: u64,
    activation_bytes: u64,
    ratio_to_standard: f64,
    output_shape: [usize; 4],
}

fn variant(name: String, c: &ConvCost, std: &ConvCost, out: [usize; 4]) -> Variant {
    Variant {
        name,
        nominal_macs: c.forward_macs_nominal,
        executed_macs: c.forward_macs_executed,
        flops: 2 * c.forward_macs_nominal,
        params: c.params,
        activation_bytes: c.activation_bytes(),
        ratio_to_standard: c.forward_macs_nominal as f64 / std.forward_macs_nominal.max(1) as f64,
        output_shape: out,
    }
}

fn layer(a: &Args, input: &str, kernel: &str, n: usize) -> Result<()> {
    let [h, w, c] = parse_hwc(input)?;
    let (kh, kw) = parse_kernel(kernel)?;
    if n == 0 || a.batch == 0 || a.depth_multiplier == 0 || a.mid == Some(0) {
        return Err(Error::invalid(
            "--filters, --batch, --depth-multiplier and --mid must be at least 1",
        ));
    }
    let p = Conv2dParams {
        stride: a.stride,
        dilation: a.dilation,
        padding: a.padding,
        groups: 1,
    };
    let x = [a.batch, c, h, w];
    let std_g = ConvGeometry::new(x, [n, c, kh, kw], &p)?;
    let std = ConvCost::of(&std_g, true);
    let r = a.mid.unwrap_or(c.min(n));
    let sp = ConvPair::spatially_separable(x, r, n, (kh, kw), &p)?;
    let ds = ConvPair::depthwise_separable(x, a.depth_multiplier, n, (kh, kw), &p)?;
    let (spc, dsc) = (sp.cost(true), ds.cost(true));
    let (dwc, pwc) = (
        ConvCost::of(&ds.first, false),
        ConvCost::of(&ds.second, true),
    );
    let rows = vec![
        variant(
            format!("standard {kh}×{kw}"),
            &std,
            &std,
            std_g.output_shape(),
        ),
        variant(
            format!("spatially separable {kh}×1 → 1×{kw} (R = {r})"),
            &spc,
            &std,
            sp.output_shape(),
        ),
        variant(
            format!("  {kh}×1 conv {c} → {r}"),
            &ConvCost::of(&sp.first, false),
            &std,
            sp.mid_shape(),
        ),
        variant(
            format!("  1×{kw} conv {r} → {n}"),
            &ConvCost::of(&sp.second, true),
            &std,
            sp.output_shape(),
        ),
        variant(
            format!("depthwise separable (K = {})", a.depth_multiplier),
            &dsc,
            &std,
            ds.output_shape(),
        ),
        variant(
            format!("  depthwise {kh}×{kw} on {c} (× {})", a.depth_multiplier),
            &dwc,
            &std,
            ds.mid_shape(),
        ),
        variant(
            format!("  pointwise 1×1 {} → {n}", c * a.depth_multiplier),
            &pwc,
            &std,
            ds.output_shape(),
        ),
    ];
    let closed = depthwise_separable_ratio(n, kh, kw);
    if a.json {
        #[derive(Serialize)]
        struct Out {
            input: [usize; 4],
            output: [usize; 4],
            pads: [usize; 4],
            variants: Vec<Variant>,
            closed_form_ratio_depthwise_separable: f64,
        }
        let out = Out {
            input: x,
            output: std_g.output_shape(),
            pads: [
                std_g.pad_top,
                std_g.pad_bottom,
                std_g.pad_left,
                std_g.pad_right,
            ],
            variants: rows,
            closed_form_ratio_depthwise_separable: closed,
        };
        println!(
            "{}",
            serde_json::to_string_pretty(&out).map_err(|e| Error::Runtime(e.to_string()))?
        );
        return Ok(());
    }
    println!(
        "Input {h}×{w}×{c} (batch {}), {n} filters {kh}×{kw}, stride {:?}, dilation {:?}, padding {} (top {}, bottom {}, left {}, right {}) → output {}×{}×{n}",
        a.batch,
        a.stride,
        a.dilation,
        a.padding,
        std_g.pad_top,
        std_g.pad_bottom,
        std_g.pad_left,
        std_g.pad_right,
        std_g.out_h,
        std_g.out_w
    );
    println!(
        "{:<44} {:>16} {:>16} {:>16} {:>10} {:>14} {:>8}",
        "variant",
        "MACs (nominal)",
        "MACs (executed)",
        "FLOPs (nominal)",
        "params",
        "activ. bytes",
        "vs std"
    );
    for v in &rows {
        println!(
            "{:<44} {:>16} {:>16} {:>16} {:>10} {:>14} {:>7.1}%",
            v.name,
            thousands(v.nominal_macs),
            thousands(v.executed_macs),
            thousands(v.flops),
            thousands(v.params),
            thousands(v.activation_bytes),
            100.0 * v.ratio_to_standard
        );
    }
    println!(
        "Closed form for depthwise separable with K = 1 and valid padding: 1/N + 1/(kh·kw) = 1/{n} + 1/{} = {:.4} ({:.1}%).",
        kh * kw,
        closed,
        closed * 100.0
    );
    println!(
        "MACs: multiply-accumulates; FLOPs = 2 × MACs. Nominal counts every tap (fvcore/ptflops convention); executed skips taps on padding. \
         Params include one bias per output channel on the last conv. Activation bytes: f32 input, intermediate and output."
    );
    Ok(())
}

/// The textbook's numbers, computed by the cost model.
pub struct Textbook {
    pub standard: u64,
    pub depthwise: u64,
    pub pointwise: u64,
    pub sobel_standard: u64,
    pub sobel_column: u64,
    pub sobel_row: u64,
}

pub fn textbook_numbers() -> Result<Textbook> {
    let v = Conv2dParams::default();
    let macs = |x: [usize; 4], w: [usize; 4], p: Conv2dParams| -> Result<u64> {
        Ok(ConvCost::of(&ConvGeometry::new(x, w, &p)?, false).forward_macs_nominal)
    };
    let ds = ConvPair::depthwise_separable([1, 3, 15, 15], 1, 10, (3, 3), &v)?;
    let sp = ConvPair::spatially_separable([1, 1, 15, 15], 1, 1, (3, 3), &v)?;
    Ok(Textbook {
        standard: macs([1, 3, 15, 15], [10, 3, 3, 3], v)?,
        depthwise: ConvCost::of(&ds.first, false).forward_macs_nominal,
        pointwise: ConvCost::of(&ds.second, false).forward_macs_nominal,
        sobel_standard: macs([1, 1, 15, 15], [1, 1, 3, 3], v)?,
        sobel_column: ConvCost::of(&sp.first, false).forward_macs_nominal,
        sobel_row: ConvCost::of(&sp.second, false).forward_macs_nominal,
    })
}

fn textbook(json: bool) -> Result<()> {
    let t = textbook_numbers()?;
    let ds = t.depthwise + t.pointwise;
    let sp = t.sobel_column + t.sobel_row;
    if json {
        let v = serde_json::json!({
            "depthwise_separable_example": {
                "input": [15, 15, 3], "filters": 10, "kernel": [3, 3], "padding": "valid",
                "standard_macs": t.standard, "depthwise_macs": t.depthwise, "pointwise_macs": t.pointwise,
                "separable_macs": ds, "ratio": ds as f64 / t.standard as f64,
                "closed_form_ratio": depthwise_separable_ratio(10, 3, 3),
            },
            "spatially_separable_example": {
                "input": [15, 15, 1], "kernel": "sobel 3x3", "padding": "valid",
                "standard_macs": t.sobel_standard, "column_macs": t.sobel_column, "row_macs": t.sobel_row,
                "separable_macs": sp, "ratio": sp as f64 / t.sobel_standard as f64,
                "textbook_separable_macs": 1170,
            },
            "units": "MACs (multiply-accumulates); FLOPs = 2 x MACs",
        });
        println!(
            "{}",
            serde_json::to_string_pretty(&v).map_err(|e| Error::Runtime(e.to_string()))?
        );
        return Ok(());
    }
    let f = thousands;
    println!("The textbook's worked examples, recomputed by sepconv's cost model.");
    println!(
        "Unit: MAC = one multiply-accumulate (the textbook's \"multiplication\"); FLOPs = 2 × MACs.\n"
    );
    println!("1. Depthwise separable convolution");
    println!(
        "   Input 15×15×3 (RGB), ten 3×3×3 kernels, valid padding → output 13×13×10 (13 = 15 − 3 + 1)."
    );
    println!(
        "   Standard: each of the 13 × 13 = 169 positions of each of the 10 kernels costs 3×3×3 = 27 MACs:"
    );
    println!("     169 × 27 × 10 = {} MACs", f(t.standard));
    println!("   Depthwise step: one 3×3×1 filter per input channel → 13×13×3:");
    println!("     169 × 9 × 3 = {} MACs", f(t.depthwise));
    println!("   Pointwise step: ten 1×1×3 filters over the 13×13×3 depthwise output:");
    println!("     169 × 3 × 10 = {} MACs", f(t.pointwise));
    println!(
        "   Total: {} + {} = {} MACs = {:.1}% of the standard layer (closed form 1/N + 1/(kh·kw) = 1/10 + 1/9 = {:.1}%).",
        f(t.depthwise),
        f(t.pointwise),
        f(ds),
        100.0 * ds as f64 / t.standard as f64,
        100.0 * depthwise_separable_ratio(10, 3, 3)
    );
    println!(
        "   Correction: the usual presentation writes \"13 × 13 = 225\" in the pointwise step. 13 × 13 = 169,"
    );
    println!("   and its own total, 5,070 = 169 × 3 × 10, uses 169.");
    println!(
        "   Caution: this is a different, cheaper layer, not the same computation. It gives the same result as"
    );
    println!(
        "   the standard layer only when, for every input channel, the 10 kernels' slices are multiples of one"
    );
    println!(
        "   3×3 kernel (rank 1 per channel); otherwise it is an approximation or a different model to train."
    );
    println!(
        "   `sepconv analyze --weight W.npy` tells which, and how far a trained layer is from it.\n"
    );
    println!("2. Spatially separable convolution");
    println!("   The Sobel filter on a 15×15 grayscale image, valid padding → 13×13.");
    println!(
        "   Standard 3×3: 13 × 13 × 9 = {} MACs",
        f(t.sobel_standard)
    );
    println!("   Sobel-x = [1, 2, 1]ᵀ · [−1, 0, 1]: a 3×1 column, then a 1×3 row.");
    println!(
        "   3×1 column over the 15×15 image → 13×15 positions: 13 × 15 × 3 = {} MACs",
        f(t.sobel_column)
    );
    println!(
        "   1×3 row over that 13×15 result → 13×13 positions:  13 × 13 × 3 = {} MACs",
        f(t.sobel_row)
    );
    println!(
        "   Total: {} + {} = {} MACs = {:.1}% of the standard.",
        f(t.sobel_column),
        f(t.sobel_row),
        f(sp),
        100.0 * sp as f64 / t.sobel_standard as f64
    );
    println!(
        "   Correction: the usual presentation says 1,170 (= 585 + 585), counting the second (1×3) pass over"
    );
    println!(
        "   15×13 positions. Run in sequence, the second pass only has the 13×13 outputs: 507 MACs."
    );
    println!(
        "   This is exact only because Sobel has rank 1; most 3×3 kernels are not spatially separable."
    );
    Ok(())
}

fn network(model: &str, json: bool) -> Result<()> {
    let spec = ModelSpec::load(model)?;
    let mut net = Network::new(&spec, 0)?;
    #[derive(Serialize)]
    struct Row {
        name: String,
        kind: String,
        output_shape: Vec<usize>,
        params: usize,
        forward_macs: u64,
        train_macs: u64,
    }
    let shapes = net.shapes().to_vec();
    let mut rows = Vec::new();
    for (i, l) in net.layers_mut().iter_mut().enumerate() {
        let m = l.module.macs();
        rows.push(Row {
            name: l.name.clone(),
            kind: l.module.kind().to_string(),
            output_shape: shapes[i + 1].clone(),
            params: l.module.params().iter().map(|p| p.value.len()).sum(),
            forward_macs: m.forward,
            train_macs: m.train(),
        });
    }
    let (fwd, train): (u64, u64) = (
        rows.iter().map(|r| r.forward_macs).sum(),
        rows.iter().map(|r| r.train_macs).sum(),
    );
    if json {
        let v = serde_json::json!({ "model": spec.name, "input": spec.input, "layers": rows,
            "params": net.param_count(), "forward_macs_per_image": fwd, "train_macs_per_image": train,
            "units": "MACs per image (multiply-accumulates, nominal); train = forward + grad-input + grad-weight" });
        println!(
            "{}",
            serde_json::to_string_pretty(&v).map_err(|e| Error::Runtime(e.to_string()))?
        );
        return Ok(());
    }
    println!(
        "{} (input {:?}), per image; MACs are nominal multiply-accumulates of conv and linear layers.",
        spec.name, spec.input
    );
    println!(
        "{:<10} {:<28} {:<16} {:>9} {:>14} {:>14} {:>7}",
        "layer", "type", "output", "params", "MACs forward", "MACs train", "share"
    );
    for r in &rows {
        let share = 100.0 * r.train_macs as f64 / train.max(1) as f64;
        let mark = if share >= 25.0 { "  ◀" } else { "" };
        println!(
            "{:<10} {:<28} {:<16} {:>9} {:>14} {:>14} {:>6.1}%{mark}",
            r.name,
            r.kind,
            format!("{:?}", r.output_shape),
            thousands(r.params as u64),
            thousands(r.forward_macs),
            thousands(r.train_macs),
            share
        );
    }
    println!(
        "{:<10} {:<28} {:<16} {:>9} {:>14} {:>14}",
        "total",
        "",
        "",
        thousands(net.param_count() as u64),
        thousands(fwd),
        thousands(train)
    );
    println!(
        "MACs train = forward + grad-input + grad-weight (the first layer needs no grad-input). ◀ marks layers with ≥ 25% of the training compute."
    );
    Ok(())
}
