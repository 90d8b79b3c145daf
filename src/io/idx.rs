//! IDX files (the MNIST format), raw or gzip-compressed.
//!
//! Format: two zero bytes, a type byte (0x08 = unsigned byte, the only type MNIST uses), the
//! number of dimensions, each dimension as a big-endian u32, then the data row-major.

use std::io::Read;
use std::path::Path;

use crate::error::{Error, Result};

/// An IDX array of unsigned bytes.
#[derive(Clone, Debug)]
pub struct IdxArray {
    /// Dimensions.
    pub dims: Vec<usize>,
    /// Values, row-major.
    pub data: Vec<u8>,
}

/// Reads an IDX file of unsigned bytes; a `.gz` name (or gzip magic) is decompressed.
pub fn read_idx(path: &Path) -> Result<IdxArray> {
    let raw = std::fs::read(path).map_err(|e| Error::file(path, super::npy::io_reason(&e)))?;
    let bytes = if raw.starts_with(&[0x1f, 0x8b]) {
        let mut out = Vec::new();
        flate2::read::GzDecoder::new(&raw[..])
            .read_to_end(&mut out)
            .map_err(|e| Error::file(path, format!("not a valid gzip file: {e}")))?;
        out
    } else {
        raw
    };
    parse_idx(&bytes).map_err(|m| Error::file(path, m))
}

/// Parses IDX bytes; the error is a message without the file name.
pub fn parse_idx(bytes: &[u8]) -> std::result::Result<IdxArray, String> {
    if bytes.len() < 4 || bytes[0] != 0 || bytes[1] != 0 {
        return Err(format!(
            "not an IDX file (magic {:02x?}, expected 00 00 08 NN)",
            &bytes[..bytes.len().min(4)]
        ));
    }
    if bytes[2] != 0x08 {
        return Err(format!(
            "IDX element type 0x{:02x} is not unsigned byte (0x08)",
            bytes[2]
        ));
    }
    let ndim = bytes[3] as usize;
    if ndim == 0 {
        return Err("IDX file has 0 dimensions".into());
    }
    let header = 4 + 4 * ndim;
    if bytes.len() < header {
        return Err("truncated IDX header".into());
    }
    let dims: Vec<usize> = (0..ndim)
        .map(|i| {
            let o = 4 + 4 * i;
            u32::from_be_bytes([bytes[o], bytes[o + 1], bytes[o + 2], bytes[o + 3]]) as usize
        })
        .collect();
    let n = dims
        .iter()
        .try_fold(1usize, |a, &d| a.checked_mul(d))
        .ok_or("IDX dimensions overflow")?;
    let data = &bytes[header..];
    if data.len() < n {
        return Err(format!(
            "truncated: dimensions {dims:?} need {n} bytes of data, the file has {}",
            data.len()
        ));
    }
    if data.len() > n {
        return Err(format!(
            "{} bytes of unexpected data after the array of dimensions {dims:?}",
            data.len() - n
        ));
    }
    Ok(IdxArray {
        dims,
        data: data.to_vec(),
    })
}

/// Serializes an unsigned-byte IDX array (used by tests to build small datasets).
pub fn idx_bytes(dims: &[usize], data: &[u8]) -> Vec<u8> {
    let mut out = vec![0, 0, 0x08, dims.len() as u8];
    for &d in dims {
        out.extend_from_slice(&(d as u32).to_be_bytes());
    }
    out.extend_from_slice(data);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip_and_errors() {
        let b = idx_bytes(&[2, 3], &[1, 2, 3, 4, 5, 6]);
        let a = parse_idx(&b).unwrap();
        assert_eq!(a.dims, vec![2, 3]);
        assert_eq!(a.data, vec![1, 2, 3, 4, 5, 6]);
        assert!(
            parse_idx(&b[..b.len() - 1])
                .unwrap_err()
                .contains("truncated")
        );
        assert!(parse_idx(&[1, 2, 3, 4]).unwrap_err().contains("not an IDX"));
        let mut f = b.clone();
        f[2] = 0x0d;
        assert!(parse_idx(&f).unwrap_err().contains("unsigned byte"));
        assert!(parse_idx(&b[..6]).unwrap_err().contains("header"));
    }
}
