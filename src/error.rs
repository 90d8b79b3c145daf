//! The library's error type.
//!
//! Every failure a user can cause (bad shapes, bad files, impossible sizes) is a value of
//! [`Error`], never a panic. Messages are single lines so the command line can print them as is.

use std::path::PathBuf;

/// Everything that can go wrong in sepconv.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A convolution's shapes or hyper-parameters do not fit together.
    #[error("{0}")]
    Geometry(String),
    /// An argument is outside its allowed range or badly formatted.
    #[error("{0}")]
    InvalidArgument(String),
    /// A buffer of this many bytes cannot be allocated (or its size overflows).
    #[error("{what} needs {bytes} bytes, which cannot be allocated")]
    TooLarge {
        /// Which buffer.
        what: String,
        /// Its size in bytes (saturated at `u128::MAX` on overflow).
        bytes: u128,
    },
    /// A file could not be read or parsed.
    #[error("{}: {message}", path.display())]
    File {
        /// The file.
        path: PathBuf,
        /// What is wrong with it.
        message: String,
    },
    /// An operating-system I/O error on a file.
    #[error("{}: {source}", path.display())]
    Io {
        /// The file.
        path: PathBuf,
        /// The underlying error.
        source: std::io::Error,
    },
    /// A failure while running (not caused by bad input), such as a diverging training run.
    #[error("{0}")]
    Runtime(String),
}

impl Error {
    /// A geometry error with a formatted message.
    pub fn geometry(msg: impl Into<String>) -> Self {
        Error::Geometry(msg.into())
    }

    /// An invalid-argument error with a formatted message.
    pub fn invalid(msg: impl Into<String>) -> Self {
        Error::InvalidArgument(msg.into())
    }

    /// A file error naming the file.
    pub fn file(path: impl Into<PathBuf>, msg: impl Into<String>) -> Self {
        Error::File {
            path: path.into(),
            message: msg.into(),
        }
    }

    /// Whether the error was caused by the user's input (exit code 2 on the command line)
    /// rather than by a failure while running (exit code 1).
    pub fn is_user_error(&self) -> bool {
        !matches!(self, Error::Runtime(_) | Error::Io { .. })
    }

    /// Re-labels a non-file error as belonging to `path` (for errors found while reading it).
    pub fn in_file(self, path: impl Into<PathBuf>) -> Self {
        match self {
            Error::Geometry(m) | Error::InvalidArgument(m) => Error::file(path, m),
            other => other,
        }
    }
}

/// The library's result type.
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Multiplies sizes, reporting overflow as [`Error::TooLarge`] for `what`.
pub fn checked_product(dims: &[usize], what: &str) -> Result<usize> {
    dims.iter()
        .try_fold(1usize, |acc, &d| acc.checked_mul(d))
        .filter(|&n| n.checked_mul(4).is_some_and(|b| b <= isize::MAX as usize))
        .ok_or_else(|| Error::TooLarge {
            what: what.to_string(),
            bytes: dims
                .iter()
                .fold(4u128, |acc, &d| acc.saturating_mul(d as u128)),
        })
}
