//! safetensors files of f32 tensors with string metadata (checkpoints).

use std::collections::HashMap;
use std::path::Path;

use safetensors::tensor::{Dtype, SafeTensors, TensorView};

use crate::error::{Error, Result};
use crate::tensor::Tensor;

/// Serializes named f32 tensors and metadata into safetensors bytes.
pub fn safetensors_bytes(
    tensors: &[(String, Tensor)],
    metadata: HashMap<String, String>,
) -> Result<Vec<u8>> {
    let bytes: Vec<Vec<u8>> = tensors
        .iter()
        .map(|(_, t)| t.data().iter().flat_map(|v| v.to_le_bytes()).collect())
        .collect();
    let views = tensors
        .iter()
        .zip(&bytes)
        .map(|((name, t), b)| {
            TensorView::new(Dtype::F32, t.shape().to_vec(), b)
                .map(|v| (name.clone(), v))
                .map_err(|e| Error::Runtime(format!("tensor {name}: {e}")))
        })
        .collect::<Result<Vec<_>>>()?;
    safetensors::serialize(views, Some(metadata))
        .map_err(|e| Error::Runtime(format!("serializing: {e}")))
}

/// A parsed safetensors file: its tensors by name and its metadata.
pub struct SafetensorsFile {
    /// Tensors by name (f32 only).
    pub tensors: HashMap<String, Tensor>,
    /// The string metadata.
    pub metadata: HashMap<String, String>,
}

/// Reads a safetensors file of f32 tensors.
pub fn read_safetensors(path: &Path) -> Result<SafetensorsFile> {
    let bytes = std::fs::read(path).map_err(|e| Error::file(path, super::npy::io_reason(&e)))?;
    let (_, meta) = SafeTensors::read_metadata(&bytes)
        .map_err(|e| Error::file(path, format!("not a valid safetensors file: {e}")))?;
    let metadata = meta.metadata().clone().unwrap_or_default();
    let st = SafeTensors::deserialize(&bytes)
        .map_err(|e| Error::file(path, format!("not a valid safetensors file: {e}")))?;
    let mut tensors = HashMap::new();
    for (name, view) in st.tensors() {
        if view.dtype() != Dtype::F32 {
            return Err(Error::file(
                path,
                format!(
                    "tensor '{name}' is {:?}, only F32 is supported",
                    view.dtype()
                ),
            ));
        }
        let data = view
            .data()
            .chunks_exact(4)
            .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
            .collect();
        tensors.insert(
            name.to_string(),
            Tensor::new(view.shape(), data).map_err(|e| e.in_file(path))?,
        );
    }
    Ok(SafetensorsFile { tensors, metadata })
}
