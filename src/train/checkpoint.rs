//! Checkpoints: one safetensors file holding a network's weights and BatchNorm statistics
//! (`{layer}.{param}`), the optimizer state (`optimizer.m.{layer}.{param}`, `optimizer.v.…`),
//! and as metadata the model spec (TOML), the training settings (JSON) and the epoch.

use std::collections::HashMap;
use std::path::Path;

use super::TrainConfig;
use super::optim::Optimizer;
use crate::error::{Error, Result};
use crate::io::safetensors::{read_safetensors, safetensors_bytes};
use crate::io::write_atomic;
use crate::nn::{ModelSpec, Network};
use crate::tensor::Tensor;

const FORMAT: &str = "sepconv-checkpoint-1";

/// What a checkpoint says besides the tensors.
#[derive(Clone, Debug)]
pub struct CheckpointMeta {
    /// Completed epochs.
    pub epoch: usize,
    /// The training settings, if the network was trained by sepconv.
    pub config: Option<TrainConfig>,
}

/// A loaded checkpoint.
pub struct Checkpoint {
    /// The network with its weights and statistics.
    pub network: Network,
    /// The optimizer state, if saved.
    pub optimizer: Option<Optimizer>,
    /// Epoch and settings.
    pub meta: CheckpointMeta,
}

/// Writes `net` (and `opt`) to `path` atomically.
pub fn save(
    path: &Path,
    net: &mut Network,
    opt: Option<&Optimizer>,
    meta: &CheckpointMeta,
) -> Result<()> {
    let source = net.spec().source.clone();
    let mut tensors: Vec<(String, Tensor)> = net.state()?.into_iter().collect();
    tensors.sort_by(|a, b| a.0.cmp(&b.0));
    let mut metadata = HashMap::from([
        ("format".to_string(), FORMAT.to_string()),
        ("model_spec".to_string(), source),
        ("epoch".to_string(), meta.epoch.to_string()),
    ]);
    if let Some(cfg) = &meta.config {
        metadata.insert(
            "training".into(),
            serde_json::to_string(cfg).map_err(|e| Error::Runtime(e.to_string()))?,
        );
    }
    if let Some(o) = opt {
        metadata.insert("optimizer_step".into(), o.step.to_string());
        let names: Vec<String> = net
            .params_mut()
            .iter()
            .map(|(l, p)| format!("{l}.{}", p.name))
            .collect();
        for ((name, m), v) in names.iter().zip(&o.m).zip(&o.v) {
            tensors.push((
                format!("optimizer.m.{name}"),
                Tensor::new(&[m.len()], m.clone())?,
            ));
            if !v.is_empty() {
                tensors.push((
                    format!("optimizer.v.{name}"),
                    Tensor::new(&[v.len()], v.clone())?,
                ));
            }
        }
    }
    write_atomic(path, &safetensors_bytes(&tensors, metadata)?)
}

/// Reads a checkpoint written by [`save`], rebuilding the network from its stored spec.
pub fn load(path: &Path) -> Result<Checkpoint> {
    let file = read_safetensors(path)?;
    let md = &file.metadata;
    if md.get("format").map(String::as_str) != Some(FORMAT) {
        return Err(Error::file(
            path,
            format!("not a sepconv checkpoint (metadata format is not {FORMAT})"),
        ));
    }
    let bad = |m: String| Error::file(path, m);
    let spec_text = md
        .get("model_spec")
        .ok_or_else(|| bad("no model_spec in the metadata".into()))?;
    let spec = ModelSpec::parse(spec_text, &format!("{} (model_spec)", path.display()))?;
    let epoch = md
        .get("epoch")
        .and_then(|e| e.parse().ok())
        .ok_or_else(|| bad("no valid epoch in the metadata".into()))?;
    let config: Option<TrainConfig> = match md.get("training") {
        Some(t) => {
            Some(serde_json::from_str(t).map_err(|e| bad(format!("training settings: {e}")))?)
        }
        None => None,
    };
    let mut network = Network::new(&spec, 0)?;
    network.load_state(&file.tensors).map_err(&bad)?;
    let take = |name: &str, shape: &[usize]| -> Result<Vec<f32>> {
        let t = file
            .tensors
            .get(name)
            .ok_or_else(|| bad(format!("missing tensor '{name}'")))?;
        if t.shape() != shape {
            return Err(bad(format!(
                "tensor '{name}' has shape {:?}, expected {shape:?}",
                t.shape()
            )));
        }
        Ok(t.data().to_vec())
    };
    let optimizer = match (&config, md.get("optimizer_step")) {
        (Some(cfg), Some(step)) => {
            let step = step
                .parse()
                .map_err(|_| bad("optimizer_step is not a number".into()))?;
            let params = network.params_mut();
            let sizes: Vec<usize> = params.iter().map(|(_, p)| p.value.len()).collect();
            let names: Vec<String> = params
                .iter()
                .map(|(l, p)| format!("{l}.{}", p.name))
                .collect();
            let mut o = Optimizer::new(cfg.optimizer, &sizes);
            o.step = step;
            for (i, name) in names.iter().enumerate() {
                o.m[i] = take(&format!("optimizer.m.{name}"), &[sizes[i]])?;
                if !o.v[i].is_empty() {
                    o.v[i] = take(&format!("optimizer.v.{name}"), &[sizes[i]])?;
                }
            }
            Some(o)
        }
        _ => None,
    };
    Ok(Checkpoint {
        network,
        optimizer,
        meta: CheckpointMeta { epoch, config },
    })
}
