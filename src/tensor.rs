//! A small owned f32 tensor: a shape and row-major (C order) contiguous data.
//!
//! The kernels work on plain slices; this type only carries a shape with its data across the
//! public API and file formats. Converting to `ndarray` is one call
//! (`Array::from_shape_vec(t.shape(), t.into_data())`), so the crate does not depend on it.

use crate::error::{Error, Result, checked_product};
use crate::memory::alloc_zeros;

/// An owned, contiguous, row-major f32 tensor.
#[derive(Clone, Debug, PartialEq)]
pub struct Tensor {
    shape: Vec<usize>,
    data: Vec<f32>,
}

impl Tensor {
    /// Wraps `data` with `shape`; fails if the element counts differ.
    pub fn new(shape: &[usize], data: Vec<f32>) -> Result<Self> {
        let n = checked_product(shape, "tensor")?;
        if n != data.len() {
            return Err(Error::invalid(format!(
                "shape {shape:?} has {n} elements but {} values were given",
                data.len()
            )));
        }
        Ok(Tensor {
            shape: shape.to_vec(),
            data,
        })
    }

    /// A zero-filled tensor; fails instead of aborting if it does not fit in memory.
    pub fn zeros(shape: &[usize]) -> Result<Self> {
        let n = checked_product(shape, "tensor")?;
        Ok(Tensor {
            shape: shape.to_vec(),
            data: alloc_zeros(n, &format!("a tensor of shape {shape:?}"))?,
        })
    }

    /// The shape.
    pub fn shape(&self) -> &[usize] {
        &self.shape
    }

    /// The data, row-major.
    pub fn data(&self) -> &[f32] {
        &self.data
    }

    /// The data, row-major, mutable.
    pub fn data_mut(&mut self) -> &mut [f32] {
        &mut self.data
    }

    /// Consumes the tensor, returning its data.
    pub fn into_data(self) -> Vec<f32> {
        self.data
    }

    /// Number of elements.
    pub fn len(&self) -> usize {
        self.data.len()
    }

    /// Whether the tensor has no elements.
    pub fn is_empty(&self) -> bool {
        self.data.is_empty()
    }

    /// The shape as four dimensions, or an error naming `what` if the rank is not 4.
    pub fn dims4(&self, what: &str) -> Result<[usize; 4]> {
        match self.shape[..] {
            [a, b, c, d] => Ok([a, b, c, d]),
            _ => Err(Error::geometry(format!(
                "{what} must be 4-D, got shape {:?}",
                self.shape
            ))),
        }
    }

    /// Returns the same data with another shape of equal element count.
    pub fn reshape(self, shape: &[usize]) -> Result<Self> {
        Tensor::new(shape, self.data)
    }
}
