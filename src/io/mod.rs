//! File formats and safe writing.
//!
//! Every file sepconv writes goes through [`AtomicFiles`]: written under a temporary name in
//! the destination folder and renamed into place only when all of a command's outputs are
//! complete, so an interrupted or failed run leaves no half-written file.

pub mod idx;
pub mod npy;
pub mod safetensors;

use std::path::{Path, PathBuf};

use crate::error::{Error, Result};

/// A set of files written under temporary names and renamed into place together on
/// [`AtomicFiles::commit`]. Dropping it without committing removes the temporary files.
#[derive(Default)]
pub struct AtomicFiles {
    pending: Vec<(PathBuf, PathBuf)>,
}

impl AtomicFiles {
    /// An empty set.
    pub fn new() -> Self {
        Self::default()
    }

    /// Writes `bytes` to a temporary file next to `path`, to be renamed to `path` on commit.
    pub fn write(&mut self, path: &Path, bytes: &[u8]) -> Result<()> {
        let name = path
            .file_name()
            .ok_or_else(|| Error::file(path, "is not a file path"))?;
        let dir = match path.parent() {
            Some(d) if !d.as_os_str().is_empty() => d.to_path_buf(),
            _ => PathBuf::from("."),
        };
        if !dir.is_dir() {
            return Err(Error::file(
                path,
                format!("folder {} does not exist", dir.display()),
            ));
        }
        let tmp = dir.join(format!(
            ".{}.tmp-{}",
            name.to_string_lossy(),
            std::process::id()
        ));
        std::fs::write(&tmp, bytes).map_err(|e| {
            let _ = std::fs::remove_file(&tmp);
            Error::file(path, format!("cannot write: {}", npy::io_reason(&e)))
        })?;
        self.pending.push((tmp, path.to_path_buf()));
        Ok(())
    }

    /// Renames every temporary file into place.
    pub fn commit(mut self) -> Result<()> {
        for (tmp, dst) in std::mem::take(&mut self.pending) {
            std::fs::rename(&tmp, &dst).map_err(|e| Error::Io {
                path: dst.clone(),
                source: e,
            })?;
        }
        Ok(())
    }
}

impl Drop for AtomicFiles {
    fn drop(&mut self) {
        for (tmp, _) in &self.pending {
            let _ = std::fs::remove_file(tmp);
        }
    }
}

/// Writes one file atomically (temporary name, then rename).
pub fn write_atomic(path: &Path, bytes: &[u8]) -> Result<()> {
    let mut files = AtomicFiles::new();
    files.write(path, bytes)?;
    files.commit()
}
