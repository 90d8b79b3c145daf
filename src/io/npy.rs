//! NumPy `.npy` files: float32, C order, any rank. Versions 1.0, 2.0 and 3.0 are read;
//! version 1.0 is written (2.0 when the header is too long for it).
//!
//! Every way a file can be wrong (not .npy, truncated, malformed header, another dtype,
//! Fortran order, wrong size) is an [`Error::File`] naming the file and the problem.

use std::path::Path;

use crate::error::{Error, Result, checked_product};
use crate::tensor::Tensor;

const MAGIC: &[u8; 6] = b"\x93NUMPY";

/// Reads a float32, C-order `.npy` file.
pub fn read_npy(path: &Path) -> Result<Tensor> {
    let bytes = std::fs::read(path).map_err(|e| Error::file(path, io_reason(&e)))?;
    parse_npy(&bytes).map_err(|m| Error::file(path, m))
}

/// Reads a `.npy` file that must be 4-D, naming `what` (e.g. "weight") in the error.
pub fn read_npy_4d(path: &Path, what: &str) -> Result<Tensor> {
    let t = read_npy(path)?;
    if t.shape().len() != 4 {
        return Err(Error::file(
            path,
            format!("{what} must be a 4-D array, got shape {:?}", t.shape()),
        ));
    }
    Ok(t)
}

/// A short description of an I/O error for messages.
pub(crate) fn io_reason(e: &std::io::Error) -> String {
    match e.kind() {
        std::io::ErrorKind::NotFound => "no such file".into(),
        std::io::ErrorKind::PermissionDenied => "permission denied".into(),
        _ => e.to_string(),
    }
}

/// Parses the bytes of a `.npy` file; the error is a message without the file name.
pub fn parse_npy(bytes: &[u8]) -> std::result::Result<Tensor, String> {
    if bytes.len() < 10 || &bytes[..6] != MAGIC {
        return Err("not a .npy file (missing \\x93NUMPY magic)".into());
    }
    let (major, minor) = (bytes[6], bytes[7]);
    let (header_len, header_start) = match major {
        1 => (u16::from_le_bytes([bytes[8], bytes[9]]) as usize, 10),
        2 | 3 => {
            if bytes.len() < 12 {
                return Err("truncated .npy header".into());
            }
            (
                u32::from_le_bytes([bytes[8], bytes[9], bytes[10], bytes[11]]) as usize,
                12,
            )
        }
        _ => return Err(format!("unsupported .npy version {major}.{minor}")),
    };
    let data_start = header_start + header_len;
    if bytes.len() < data_start {
        return Err(format!(
            "truncated .npy header: it says {header_len} bytes but the file has {}",
            bytes.len() - header_start
        ));
    }
    let header = std::str::from_utf8(&bytes[header_start..data_start])
        .map_err(|_| "malformed .npy header (not text)".to_string())?;
    let h = parse_header(header)?;
    if h.descr != "<f4" {
        return Err(format!(
            "dtype '{}'{} is not float32 ('<f4'); convert with x.astype(np.float32)",
            h.descr,
            describe_dtype(&h.descr)
        ));
    }
    if h.fortran_order {
        return Err(
            "array is in Fortran order; save a C-order array (np.ascontiguousarray(x))".into(),
        );
    }
    let n = checked_product(&h.shape, "array").map_err(|e| e.to_string())?;
    let data = &bytes[data_start..];
    let want = n * 4;
    if data.len() < want {
        return Err(format!(
            "truncated data: shape {:?} needs {want} bytes, the file has {}",
            h.shape,
            data.len()
        ));
    }
    if data.len() > want {
        return Err(format!(
            "{} bytes of unexpected data after the array of shape {:?}",
            data.len() - want,
            h.shape
        ));
    }
    let values = data
        .chunks_exact(4)
        .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
        .collect();
    Tensor::new(&h.shape, values).map_err(|e| e.to_string())
}

fn describe_dtype(descr: &str) -> &'static str {
    match descr.trim_start_matches(['<', '>', '|', '=']) {
        "f8" => " (float64)",
        "f2" => " (float16)",
        "i8" => " (int64)",
        "i4" => " (int32)",
        "u1" => " (uint8)",
        "b1" => " (bool)",
        "f4" => " (big-endian float32)",
        _ => "",
    }
}

struct Header {
    descr: String,
    fortran_order: bool,
    shape: Vec<usize>,
}

/// Parses the Python dict literal of a `.npy` header.
fn parse_header(text: &str) -> std::result::Result<Header, String> {
    let bad = |why: &str| format!("malformed .npy header ({why}): {}", text.trim());
    let mut p = Parser {
        s: text.as_bytes(),
        i: 0,
    };
    p.expect(b'{').map_err(|_| bad("expected '{'"))?;
    let (mut descr, mut fortran, mut shape) = (None, None, None);
    loop {
        p.skip_ws();
        if p.peek() == Some(b'}') {
            break;
        }
        let key = p.string().ok_or_else(|| bad("expected a quoted key"))?;
        p.expect(b':').map_err(|_| bad("expected ':'"))?;
        p.skip_ws();
        match key.as_str() {
            "descr" => descr = Some(p.string().ok_or_else(|| bad("descr is not a string"))?),
            "fortran_order" => {
                fortran = Some(
                    p.boolean()
                        .ok_or_else(|| bad("fortran_order is not True/False"))?,
                )
            }
            "shape" => {
                shape = Some(
                    p.tuple()
                        .ok_or_else(|| bad("shape is not a tuple of integers"))?,
                )
            }
            _ => return Err(bad(&format!("unknown key '{key}'"))),
        }
        p.skip_ws();
        match p.peek() {
            Some(b',') => p.i += 1,
            Some(b'}') => {}
            _ => return Err(bad("expected ',' or '}'")),
        }
    }
    Ok(Header {
        descr: descr.ok_or_else(|| bad("no 'descr'"))?,
        fortran_order: fortran.ok_or_else(|| bad("no 'fortran_order'"))?,
        shape: shape.ok_or_else(|| bad("no 'shape'"))?,
    })
}

struct Parser<'a> {
    s: &'a [u8],
    i: usize,
}

impl Parser<'_> {
    fn peek(&self) -> Option<u8> {
        self.s.get(self.i).copied()
    }
    fn skip_ws(&mut self) {
        while matches!(self.peek(), Some(b' ' | b'\t' | b'\n' | b'\r')) {
            self.i += 1;
        }
    }
    fn expect(&mut self, c: u8) -> std::result::Result<(), ()> {
        self.skip_ws();
        if self.peek() == Some(c) {
            self.i += 1;
            Ok(())
        } else {
            Err(())
        }
    }
    fn string(&mut self) -> Option<String> {
        self.skip_ws();
        let q = self.peek().filter(|&c| c == b'\'' || c == b'"')?;
        let start = self.i + 1;
        let len = self.s[start..].iter().position(|&c| c == q)?;
        self.i = start + len + 1;
        String::from_utf8(self.s[start..start + len].to_vec()).ok()
    }
    fn boolean(&mut self) -> Option<bool> {
        for (word, v) in [(&b"True"[..], true), (&b"False"[..], false)] {
            if self.s[self.i..].starts_with(word) {
                self.i += word.len();
                return Some(v);
            }
        }
        None
    }
    fn tuple(&mut self) -> Option<Vec<usize>> {
        self.expect(b'(').ok()?;
        let mut dims = Vec::new();
        loop {
            self.skip_ws();
            match self.peek()? {
                b')' => {
                    self.i += 1;
                    return Some(dims);
                }
                b',' => self.i += 1,
                b'0'..=b'9' => {
                    let start = self.i;
                    while matches!(self.peek(), Some(b'0'..=b'9')) {
                        self.i += 1;
                    }
                    // A trailing 'L' appears in headers written by Python 2.
                    if self.peek() == Some(b'L') {
                        self.i += 1;
                    }
                    let digits = std::str::from_utf8(&self.s[start..self.i]).ok()?;
                    dims.push(digits.trim_end_matches('L').parse().ok()?);
                }
                _ => return None,
            }
        }
    }
}

/// Serializes `t` as a version-1.0 `.npy` file (2.0 if the header does not fit).
pub fn npy_bytes(t: &Tensor) -> Vec<u8> {
    let shape = match t.shape() {
        [d] => format!("({d},)"),
        dims => format!(
            "({})",
            dims.iter()
                .map(|d| d.to_string())
                .collect::<Vec<_>>()
                .join(", ")
        ),
    };
    let dict = format!("{{'descr': '<f4', 'fortran_order': False, 'shape': {shape}, }}");
    let v1 = dict.len() + 1 + 10 <= u16::MAX as usize;
    let prefix = if v1 { 10 } else { 12 };
    // Pad so the data starts on a 64-byte boundary, ending the header with '\n'.
    let total = (prefix + dict.len() + 1).div_ceil(64) * 64;
    let header_len = total - prefix;
    let mut out = Vec::with_capacity(total + t.len() * 4);
    out.extend_from_slice(MAGIC);
    if v1 {
        out.extend_from_slice(&[1, 0]);
        out.extend_from_slice(&(header_len as u16).to_le_bytes());
    } else {
        out.extend_from_slice(&[2, 0]);
        out.extend_from_slice(&(header_len as u32).to_le_bytes());
    }
    out.extend_from_slice(dict.as_bytes());
    out.resize(total - 1, b' ');
    out.push(b'\n');
    for v in t.data() {
        out.extend_from_slice(&v.to_le_bytes());
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn with_header(dict: &str, data: &[u8]) -> Vec<u8> {
        let mut b = MAGIC.to_vec();
        b.extend_from_slice(&[1, 0]);
        b.extend_from_slice(&(dict.len() as u16).to_le_bytes());
        b.extend_from_slice(dict.as_bytes());
        b.extend_from_slice(data);
        b
    }

    #[test]
    fn round_trips() {
        for shape in [vec![2, 3, 4, 5], vec![7], vec![], vec![0, 3]] {
            let n: usize = shape.iter().product();
            let t = Tensor::new(&shape, (0..n).map(|i| i as f32 * 0.5 - 3.0).collect()).unwrap();
            let bytes = npy_bytes(&t);
            assert_eq!(bytes.len() % 64, (n * 4) % 64);
            assert_eq!(parse_npy(&bytes).unwrap(), t);
        }
    }

    #[test]
    fn refuses_bad_files() {
        let four = 1.0f32.to_le_bytes();
        let cases: Vec<(Vec<u8>, &str)> = vec![
            (b"hello world".to_vec(), "not a .npy"),
            (MAGIC.to_vec(), "not a .npy"),
            (
                with_header(
                    "{'descr': '<f8', 'fortran_order': False, 'shape': (1,), }",
                    &[0; 8],
                ),
                "float64",
            ),
            (
                with_header(
                    "{'descr': '<f4', 'fortran_order': True, 'shape': (1,), }",
                    &four,
                ),
                "Fortran",
            ),
            (
                with_header(
                    "{'descr': '<f4', 'fortran_order': False, 'shape': (2,), }",
                    &four,
                ),
                "truncated data",
            ),
            (
                with_header(
                    "{'descr': '<f4', 'fortran_order': False, 'shape': (1,), }",
                    &[0; 8],
                ),
                "unexpected data",
            ),
            (
                with_header(
                    "{'descr': '<f4', 'fortran_order': False, 'shape': (1,",
                    &four,
                ),
                "malformed",
            ),
            (
                with_header("{'descr': '<f4', 'shape': (1,), }", &four),
                "fortran_order",
            ),
            (
                with_header(
                    "{'descr': '<f4', 'fortran_order': False, 'shape': (1, x), }",
                    &four,
                ),
                "malformed",
            ),
        ];
        for (bytes, want) in cases {
            let err = parse_npy(&bytes).unwrap_err();
            assert!(err.contains(want), "{err:?} should mention {want:?}");
        }
        // Header length past the end of the file.
        let mut b = with_header(
            "{'descr': '<f4', 'fortran_order': False, 'shape': (1,), }",
            &four,
        );
        b[8] = 0xff;
        assert!(parse_npy(&b).unwrap_err().contains("truncated .npy header"));
        // Huge shape: overflow is an error, not a panic or an allocation attempt.
        let b = with_header(
            "{'descr': '<f4', 'fortran_order': False, 'shape': (99999999999, 99999999999), }",
            &four,
        );
        assert!(parse_npy(&b).is_err());
    }
}
