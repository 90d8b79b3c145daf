//! Whole-network conversion: every standard convolution of a trained network (except those
//! with one input channel, which have nothing to separate) becomes its best depthwise-separable
//! approximation, with a new model spec and weights.

use serde::Serialize;

use super::depthwise::{DepthwiseAnalysis, decompose};
use super::{Truncation, Weight};
use crate::error::{Error, Result};
use crate::nn::Network;
use crate::nn::spec::{LayerSpec, ModelSpec};

/// What happened to one converted layer.
#[derive(Clone, Debug, Serialize)]
pub struct LayerConversion {
    /// Layer name.
    pub name: String,
    /// Weight shape [N, M, kh, kw].
    pub shape: [usize; 4],
    /// Depth multiplier chosen.
    pub k: usize,
    /// The smallest K that is exact for this layer.
    pub exact_k: usize,
    /// Relative Frobenius error of the weight approximation.
    pub relative_error: f64,
    /// Forward MACs per image before.
    pub macs_before: u64,
    /// Forward MACs per image after.
    pub macs_after: u64,
}

/// Converts every standard convolution (groups 1, more than one input channel) of `net` into a
/// depthwise-separable layer truncated by `trunc`. Returns the new network and a report.
pub fn to_depthwise_separable(
    net: &mut Network,
    trunc: Truncation,
) -> Result<(Network, Vec<LayerConversion>)> {
    trunc.validate()?;
    let mut spec: ModelSpec = net.spec().clone();
    let mut weights = net.state()?;
    let shapes = net.shapes().to_vec();
    let macs_before: Vec<u64> = net
        .layers()
        .iter()
        .map(|l| l.module.macs().forward)
        .collect();
    let mut conversions = Vec::new();
    for (i, entry) in spec.layers.iter_mut().enumerate() {
        let LayerSpec::Conv2d {
            out_channels,
            kernel,
            stride,
            dilation,
            padding,
            groups,
            bias,
        } = entry.layer.clone()
        else {
            continue;
        };
        if groups.unwrap_or(1) != 1 || shapes[i].first().copied().unwrap_or(0) <= 1 {
            continue;
        }
        let name = entry.name.clone().unwrap_or_else(|| format!("layer{i}"));
        let wt = weights
            .remove(&format!("{name}.weight"))
            .ok_or_else(|| Error::Runtime(format!("no weight for layer '{name}'")))?;
        let w = Weight::from_tensor(&wt)?;
        let analysis = DepthwiseAnalysis::of(&w)?;
        let k = trunc.pick(&analysis.errors).max(1);
        let f = decompose(&w, &analysis, k)?;
        weights.insert(format!("{name}.first.weight"), f.depthwise);
        weights.insert(format!("{name}.second.weight"), f.pointwise);
        entry.name = Some(name.clone());
        entry.layer = LayerSpec::DepthwiseSeparableConv2d {
            out_channels,
            kernel,
            stride,
            dilation,
            padding,
            multiplier: Some(k),
            bias,
        };
        conversions.push(LayerConversion {
            name,
            shape: [w.n, w.m, w.kh, w.kw],
            k,
            exact_k: analysis.exact_multiplier(),
            relative_error: f.predicted_error,
            macs_before: macs_before[i],
            macs_after: 0,
        });
    }
    spec.name = format!("{}-decomposed", spec.name);
    spec.source = spec.to_toml()?;
    let mut out = Network::new(&spec, 0)?;
    out.load_state(&weights).map_err(Error::Runtime)?;
    for c in &mut conversions {
        if let Some(l) = out.layers().iter().find(|l| l.name == c.name) {
            c.macs_after = l.module.macs().forward;
        }
    }
    Ok((out, conversions))
}
