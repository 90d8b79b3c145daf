//! Model specs: a TOML file listing the input shape and the layers, so users define their own
//! networks. The presets `mnist-ref-std`, `mnist-ref-ds` and `mnist-ref-sp` (DESIGN.md) are the
//! files under `examples/`, compiled in.
//!
//! ```toml
//! name = "tiny"
//! input = [1, 28, 28]          # [channels, height, width]
//!
//! [[layers]]
//! type = "conv2d"              # or depthwise_separable_conv2d, spatially_separable_conv2d
//! name = "conv1"               # optional; names checkpoint tensors and `--layer`
//! out_channels = 8
//! kernel = 3                   # or [kh, kw]
//! padding = 1                  # P, [PH, PW], [T, B, L, R], "valid", "same", "same-lower"
//! stride = 1                   # or [SH, SW]; also dilation; groups (conv2d)
//! bias = false                 # default true
//!
//! [[layers]]
//! type = "relu"                # batchnorm2d, maxpool2d, global_avg_pool, flatten, linear, dropout
//! ```

use std::path::Path;

use serde::{Deserialize, Serialize};

use super::conv::SeparableKind;
use super::{
    BatchNorm2d, Conv2d, Dropout, Flatten, GlobalAvgPool, Linear, MaxPool2d, Module, Relu,
    SeparableConv2d,
};
use crate::error::{Error, Result};
use crate::geometry::{Conv2dParams, Padding};
use crate::rng::Rng;

/// The built-in presets: (name, TOML text).
pub const PRESETS: [(&str, &str); 3] = [
    (
        "mnist-ref-std",
        include_str!("../../examples/mnist-ref-std.toml"),
    ),
    (
        "mnist-ref-ds",
        include_str!("../../examples/mnist-ref-ds.toml"),
    ),
    (
        "mnist-ref-sp",
        include_str!("../../examples/mnist-ref-sp.toml"),
    ),
];

/// A network description.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct ModelSpec {
    /// A name for reports.
    pub name: String,
    /// Per-image input shape [C, H, W].
    pub input: Vec<usize>,
    /// The layers, in order.
    pub layers: Vec<LayerEntry>,
    /// The TOML text the spec was read from (stored in checkpoints).
    #[serde(skip)]
    pub source: String,
    /// Where the spec came from (a file path or preset name), for error messages.
    #[serde(skip)]
    pub origin: String,
}

/// One layer with its optional name.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct LayerEntry {
    /// Name given in the spec.
    pub name: Option<String>,
    /// What the layer is.
    pub layer: LayerSpec,
}

/// A number or a pair: `3` or `[3, 1]`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Deserialize, Serialize)]
#[serde(untagged)]
pub enum Pair {
    /// Same on both axes.
    One(usize),
    /// (vertical, horizontal).
    Two([usize; 2]),
}

impl Pair {
    fn get(self) -> (usize, usize) {
        match self {
            Pair::One(v) => (v, v),
            Pair::Two([a, b]) => (a, b),
        }
    }
}

/// Padding as written in a spec.
#[derive(Clone, Debug, PartialEq, Eq, Deserialize, Serialize)]
#[serde(untagged)]
pub enum PaddingSpec {
    /// Same on all sides.
    One(usize),
    /// Explicit list: [PH, PW] or [T, B, L, R].
    List(Vec<usize>),
    /// `valid`, `same` or `same-lower`.
    Name(String),
}

impl PaddingSpec {
    fn resolve(&self) -> Result<Padding> {
        match self {
            PaddingSpec::One(p) => Ok(Padding::symmetric(*p, *p)),
            PaddingSpec::List(v) => match v[..] {
                [ph, pw] => Ok(Padding::symmetric(ph, pw)),
                [top, bottom, left, right] => Ok(Padding::Explicit {
                    top,
                    bottom,
                    left,
                    right,
                }),
                _ => Err(Error::invalid(format!(
                    "padding list {v:?} must be [PH, PW] or [T, B, L, R]"
                ))),
            },
            PaddingSpec::Name(s) => s.parse(),
        }
    }
}

fn default_true() -> bool {
    true
}

/// One layer type with its arguments.
#[derive(Clone, Debug, PartialEq, Deserialize, Serialize)]
#[serde(tag = "type", rename_all = "snake_case", deny_unknown_fields)]
pub enum LayerSpec {
    /// Standard or grouped convolution.
    Conv2d {
        /// Output channels.
        out_channels: usize,
        /// Kernel size.
        kernel: Pair,
        /// Stride (default 1).
        stride: Option<Pair>,
        /// Dilation (default 1).
        dilation: Option<Pair>,
        /// Padding (default valid).
        padding: Option<PaddingSpec>,
        /// Groups (default 1).
        groups: Option<usize>,
        /// Whether the layer has a bias (default true).
        #[serde(default = "default_true")]
        bias: bool,
    },
    /// Depthwise kh×kw (multiplier K) then pointwise 1×1 (Keras `SeparableConv2D`).
    DepthwiseSeparableConv2d {
        /// Output channels.
        out_channels: usize,
        /// Kernel size.
        kernel: Pair,
        /// Stride of the depthwise step.
        stride: Option<Pair>,
        /// Dilation of the depthwise step.
        dilation: Option<Pair>,
        /// Padding of the depthwise step.
        padding: Option<PaddingSpec>,
        /// Depth multiplier K (default 1).
        multiplier: Option<usize>,
        /// Bias on the pointwise step (default true).
        #[serde(default = "default_true")]
        bias: bool,
    },
    /// kh×1 to R middle channels, then 1×kw.
    SpatiallySeparableConv2d {
        /// Output channels.
        out_channels: usize,
        /// Kernel size (kh, kw).
        kernel: Pair,
        /// Stride.
        stride: Option<Pair>,
        /// Dilation.
        dilation: Option<Pair>,
        /// Padding of the full kh×kw kernel, split by axis.
        padding: Option<PaddingSpec>,
        /// Middle channels R (default min(in, out)).
        mid_channels: Option<usize>,
        /// Bias on the second conv (default true).
        #[serde(default = "default_true")]
        bias: bool,
    },
    /// Batch normalization.
    Batchnorm2d {
        /// Running-statistics momentum (default 0.1).
        momentum: Option<f32>,
        /// Epsilon (default 1e-5).
        eps: Option<f32>,
    },
    /// max(x, 0).
    Relu,
    /// Max pooling.
    Maxpool2d {
        /// Window size.
        kernel: usize,
        /// Stride (default = kernel).
        stride: Option<usize>,
        /// Padding (default 0).
        padding: Option<usize>,
    },
    /// Mean over each channel.
    GlobalAvgPool,
    /// [C, H, W] → [C·H·W].
    Flatten,
    /// Fully connected.
    Linear {
        /// Output features.
        out_features: usize,
        /// Whether the layer has a bias (default true).
        #[serde(default = "default_true")]
        bias: bool,
    },
    /// Dropout with probability p.
    Dropout {
        /// Drop probability in [0, 1).
        p: f32,
    },
}

impl LayerSpec {
    /// The type name as written in specs.
    pub fn kind(&self) -> &'static str {
        match self {
            LayerSpec::Conv2d { .. } => "conv2d",
            LayerSpec::DepthwiseSeparableConv2d { .. } => "depthwise_separable_conv2d",
            LayerSpec::SpatiallySeparableConv2d { .. } => "spatially_separable_conv2d",
            LayerSpec::Batchnorm2d { .. } => "batchnorm2d",
            LayerSpec::Relu => "relu",
            LayerSpec::Maxpool2d { .. } => "maxpool2d",
            LayerSpec::GlobalAvgPool => "global_avg_pool",
            LayerSpec::Flatten => "flatten",
            LayerSpec::Linear { .. } => "linear",
            LayerSpec::Dropout { .. } => "dropout",
        }
    }

    /// Builds the layer for per-image input `in_shape`.
    pub fn build(&self, in_shape: &[usize], first: bool, rng: &mut Rng) -> Result<Box<dyn Module>> {
        let conv_params = |stride: &Option<Pair>,
                           dilation: &Option<Pair>,
                           padding: &Option<PaddingSpec>,
                           groups: usize|
         -> Result<Conv2dParams> {
            let stride = stride.map_or((1, 1), Pair::get);
            let dilation = dilation.map_or((1, 1), Pair::get);
            if stride.0 == 0 || stride.1 == 0 || dilation.0 == 0 || dilation.1 == 0 {
                return Err(Error::invalid("stride and dilation must be at least 1"));
            }
            let padding = padding
                .as_ref()
                .map_or(Ok(Padding::Valid), PaddingSpec::resolve)?;
            Ok(Conv2dParams {
                stride,
                dilation,
                padding,
                groups,
            })
        };
        let positive = |v: usize, what: &str| {
            if v == 0 {
                Err(Error::invalid(format!("{what} must be at least 1")))
            } else {
                Ok(v)
            }
        };
        Ok(match self {
            LayerSpec::Conv2d {
                out_channels,
                kernel,
                stride,
                dilation,
                padding,
                groups,
                bias,
            } => {
                let p = conv_params(stride, dilation, padding, groups.unwrap_or(1))?;
                Box::new(Conv2d::new(
                    in_shape,
                    positive(*out_channels, "out_channels")?,
                    kernel.get(),
                    p,
                    *bias,
                    first,
                    rng,
                )?)
            }
            LayerSpec::DepthwiseSeparableConv2d {
                out_channels,
                kernel,
                stride,
                dilation,
                padding,
                multiplier,
                bias,
            } => {
                let p = conv_params(stride, dilation, padding, 1)?;
                let kind = SeparableKind::Depthwise {
                    multiplier: positive(multiplier.unwrap_or(1), "multiplier")?,
                };
                Box::new(SeparableConv2d::new(
                    kind,
                    in_shape,
                    positive(*out_channels, "out_channels")?,
                    kernel.get(),
                    p,
                    *bias,
                    first,
                    rng,
                )?)
            }
            LayerSpec::SpatiallySeparableConv2d {
                out_channels,
                kernel,
                stride,
                dilation,
                padding,
                mid_channels,
                bias,
            } => {
                let p = conv_params(stride, dilation, padding, 1)?;
                let m = in_shape.first().copied().unwrap_or(0);
                let mid = positive(mid_channels.unwrap_or(m.min(*out_channels)), "mid_channels")?;
                let kind = SeparableKind::Spatial { mid };
                Box::new(SeparableConv2d::new(
                    kind,
                    in_shape,
                    positive(*out_channels, "out_channels")?,
                    kernel.get(),
                    p,
                    *bias,
                    first,
                    rng,
                )?)
            }
            LayerSpec::Batchnorm2d { momentum, eps } => Box::new(BatchNorm2d::new(
                in_shape,
                momentum.unwrap_or(0.1),
                eps.unwrap_or(1e-5),
            )?),
            LayerSpec::Relu => Box::new(Relu::new(in_shape)),
            LayerSpec::Maxpool2d {
                kernel,
                stride,
                padding,
            } => Box::new(MaxPool2d::new(
                in_shape,
                *kernel,
                stride.unwrap_or(*kernel),
                padding.unwrap_or(0),
            )?),
            LayerSpec::GlobalAvgPool => Box::new(GlobalAvgPool::new(in_shape)?),
            LayerSpec::Flatten => Box::new(Flatten::new(in_shape)),
            LayerSpec::Linear { out_features, bias } => {
                Box::new(Linear::new(in_shape, *out_features, *bias, first, rng)?)
            }
            LayerSpec::Dropout { p } => Box::new(Dropout::new(in_shape, *p)?),
        })
    }
}

/// The raw TOML shape of a spec, before layers are validated one by one.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawSpec {
    name: Option<String>,
    input: Vec<usize>,
    layers: Vec<toml::Table>,
}

impl ModelSpec {
    /// Parses a spec from TOML text; `origin` names the file (or preset) in errors.
    pub fn parse(text: &str, origin: &str) -> Result<Self> {
        let raw: RawSpec = toml::from_str(text)
            .map_err(|e| Error::invalid(format!("{origin}: {}", one_line(&e.to_string()))))?;
        if raw.input.len() != 3 || raw.input.contains(&0) {
            return Err(Error::invalid(format!(
                "{origin}: input must be [channels, height, width] with sizes >= 1, got {:?}",
                raw.input
            )));
        }
        if raw.layers.is_empty() {
            return Err(Error::invalid(format!("{origin}: no [[layers]]")));
        }
        let mut layers = Vec::with_capacity(raw.layers.len());
        let mut names = std::collections::HashSet::new();
        for (i, mut table) in raw.layers.into_iter().enumerate() {
            let name = match table.remove("name") {
                None => None,
                Some(toml::Value::String(s)) => Some(s),
                Some(other) => {
                    return Err(Error::invalid(format!(
                        "{origin}: layer {i}: name must be a string, got {other}"
                    )));
                }
            };
            let layer: LayerSpec =
                toml::Value::Table(table)
                    .try_into()
                    .map_err(|e: toml::de::Error| {
                        Error::invalid(format!("{origin}: layer {i}: {}", one_line(&e.to_string())))
                    })?;
            let unique = name.clone().unwrap_or_else(|| format!("layer{i}"));
            if !names.insert(unique.clone()) {
                return Err(Error::invalid(format!(
                    "{origin}: layer {i}: name '{unique}' is used twice"
                )));
            }
            layers.push(LayerEntry { name, layer });
        }
        Ok(ModelSpec {
            name: raw.name.unwrap_or_else(|| origin.to_string()),
            input: raw.input,
            layers,
            source: text.to_string(),
            origin: origin.to_string(),
        })
    }

    /// The spec as TOML (the format [`ModelSpec::parse`] reads).
    pub fn to_toml(&self) -> Result<String> {
        #[derive(Serialize)]
        struct Out<'a> {
            name: &'a str,
            input: &'a [usize],
            layers: Vec<toml::Table>,
        }
        let mut layers = Vec::with_capacity(self.layers.len());
        for entry in &self.layers {
            let mut t = toml::Table::try_from(&entry.layer)
                .map_err(|e| Error::Runtime(format!("spec to TOML: {e}")))?;
            if let Some(n) = &entry.name {
                t.insert("name".into(), toml::Value::String(n.clone()));
            }
            layers.push(t);
        }
        toml::to_string(&Out {
            name: &self.name,
            input: &self.input,
            layers,
        })
        .map_err(|e| Error::Runtime(format!("spec to TOML: {e}")))
    }

    /// A preset by name, or a TOML file by path.
    pub fn load(preset_or_path: &str) -> Result<Self> {
        if let Some((name, text)) = PRESETS.iter().find(|(n, _)| *n == preset_or_path) {
            return Self::parse(text, name);
        }
        let path = Path::new(preset_or_path);
        if !path.exists() {
            let names: Vec<&str> = PRESETS.iter().map(|(n, _)| *n).collect();
            return Err(Error::file(
                path,
                format!("no such file, and not a preset ({})", names.join(", ")),
            ));
        }
        let text = std::fs::read_to_string(path).map_err(|e| Error::file(path, e.to_string()))?;
        Self::parse(&text, &path.display().to_string())
    }
}

/// Joins a multi-line message (as toml's errors are) into one line.
fn one_line(s: &str) -> String {
    s.lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.chars().all(|c| "|^ ".contains(c)))
        .collect::<Vec<_>>()
        .join(" ")
}
