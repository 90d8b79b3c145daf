//! Datasets in the MNIST layout: a folder with train-images-idx3-ubyte[.gz],
//! train-labels-idx1-ubyte[.gz], t10k-images-idx3-ubyte[.gz] and t10k-labels-idx1-ubyte[.gz].
//! Images are normalized as (pixel / 255 − mean) / std and batched in a seeded shuffled order.

use std::path::{Path, PathBuf};

use crate::error::{Error, Result};
use crate::io::idx::read_idx;
use crate::rng::Rng;

/// MNIST's normalization constants (mean and standard deviation of the training pixels / 255).
pub const MNIST_MEAN: f32 = 0.1307;
/// See [`MNIST_MEAN`].
pub const MNIST_STD: f32 = 0.3081;

/// Images (normalized, [N, 1, H, W]) and their labels.
#[derive(Clone, Debug)]
pub struct Dataset {
    /// Normalized pixels, image after image.
    pub images: Vec<f32>,
    /// One label per image.
    pub labels: Vec<u8>,
    /// Per-image shape [1, H, W].
    pub shape: [usize; 3],
}

impl Dataset {
    /// Number of images.
    pub fn len(&self) -> usize {
        self.labels.len()
    }

    /// Whether there are no images.
    pub fn is_empty(&self) -> bool {
        self.labels.is_empty()
    }

    /// Elements per image.
    pub fn image_len(&self) -> usize {
        self.shape.iter().product()
    }

    /// Copies the images and labels at `indices` into `x` and `y`.
    pub fn gather(&self, indices: &[usize], x: &mut Vec<f32>, y: &mut Vec<u8>) {
        let n = self.image_len();
        x.clear();
        y.clear();
        for &i in indices {
            x.extend_from_slice(&self.images[i * n..(i + 1) * n]);
            y.push(self.labels[i]);
        }
    }

    /// Keeps only the first `n` images.
    pub fn truncate(&mut self, n: usize) {
        if n < self.len() {
            self.images.truncate(n * self.image_len());
            self.labels.truncate(n);
        }
    }

    /// A seeded random permutation of the image indices.
    pub fn shuffled_indices(&self, rng: &mut Rng) -> Vec<usize> {
        let mut idx: Vec<usize> = (0..self.len()).collect();
        rng.shuffle(&mut idx);
        idx
    }

    /// Checks every label is below `classes`.
    pub fn check_labels(&self, classes: usize, origin: &Path) -> Result<()> {
        if let Some((i, &l)) = self
            .labels
            .iter()
            .enumerate()
            .find(|(_, l)| **l as usize >= classes)
        {
            return Err(Error::file(
                origin,
                format!(
                    "label {l} of image {i} is out of range for a network with {classes} outputs"
                ),
            ));
        }
        Ok(())
    }
}

/// The training and test split of a dataset folder.
pub struct Splits {
    /// Training images.
    pub train: Dataset,
    /// Test images.
    pub test: Dataset,
    /// The folder.
    pub dir: PathBuf,
}

/// Finds `name` or `name.gz` in `dir`.
fn find(dir: &Path, name: &str) -> Result<PathBuf> {
    for candidate in [dir.join(name), dir.join(format!("{name}.gz"))] {
        if candidate.is_file() {
            return Ok(candidate);
        }
    }
    Err(Error::file(
        dir,
        format!("neither {name} nor {name}.gz is in this folder"),
    ))
}

/// Loads one split (`train` or `t10k`) of an MNIST-layout folder, normalizing with mean/std.
pub fn load_split(dir: &Path, prefix: &str, mean: f32, std: f32) -> Result<(Dataset, PathBuf)> {
    let img_path = find(dir, &format!("{prefix}-images-idx3-ubyte"))?;
    let lbl_path = find(dir, &format!("{prefix}-labels-idx1-ubyte"))?;
    let images = read_idx(&img_path)?;
    let labels = read_idx(&lbl_path)?;
    let [n, h, w] = images.dims[..] else {
        return Err(Error::file(
            &img_path,
            format!(
                "images must be 3-D [N, H, W], got dimensions {:?}",
                images.dims
            ),
        ));
    };
    if labels.dims.len() != 1 {
        return Err(Error::file(
            &lbl_path,
            format!("labels must be 1-D [N], got dimensions {:?}", labels.dims),
        ));
    }
    if labels.dims[0] != n {
        return Err(Error::file(
            &lbl_path,
            format!(
                "has {} labels but {} has {n} images",
                labels.dims[0],
                img_path.display()
            ),
        ));
    }
    if n == 0 || h == 0 || w == 0 {
        return Err(Error::file(&img_path, "holds no images"));
    }
    let scale = 1.0 / (255.0 * std);
    let shift = mean / std;
    let pixels = images
        .data
        .iter()
        .map(|&p| p as f32 * scale - shift)
        .collect();
    Ok((
        Dataset {
            images: pixels,
            labels: labels.data,
            shape: [1, h, w],
        },
        lbl_path,
    ))
}

/// Loads both splits, checking image shapes against the network's input and labels against its
/// number of outputs.
pub fn load_splits(dir: &Path, input: &[usize], classes: usize) -> Result<Splits> {
    let train = load_checked_split(dir, "train", input, classes)?;
    let test = load_checked_split(dir, "t10k", input, classes)?;
    Ok(Splits {
        train,
        test,
        dir: dir.to_path_buf(),
    })
}

/// Loads split `name` ("train" or "t10k") of the MNIST-format folder `dir`, normalized with the
/// MNIST statistics, checking its image shape against the network's `input` and its labels
/// against `classes`.
pub fn load_checked_split(
    dir: &Path,
    name: &str,
    input: &[usize],
    classes: usize,
) -> Result<Dataset> {
    if !dir.is_dir() {
        return Err(Error::file(
            dir,
            "no such folder (expected MNIST-format IDX files in it)",
        ));
    }
    let (data, labels) = load_split(dir, name, MNIST_MEAN, MNIST_STD)?;
    if data.shape[..] != input[..] {
        return Err(Error::file(
            dir,
            format!(
                "images are {:?} but the network expects {:?}",
                data.shape, input
            ),
        ));
    }
    data.check_labels(classes, &labels)?;
    Ok(data)
}
