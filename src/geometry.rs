//! Convolution geometry: from shapes, strides, dilations and a padding rule to output sizes and
//! the explicit zero padding on each side. Every inconsistency is a typed error, checked once
//! here so the kernels can trust the shapes they are given.

use std::fmt;
use std::str::FromStr;

use crate::error::{Error, Result, checked_product};

/// How the input is zero-padded.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum Padding {
    /// No padding.
    #[default]
    Valid,
    /// TF/Keras `same` = ONNX `SAME_UPPER`: output = ceil(input / stride); an odd total padding
    /// puts the extra pixel after (bottom/right).
    Same,
    /// ONNX `SAME_LOWER`: as [`Padding::Same`] but the extra pixel goes before (top/left).
    SameLower,
    /// Explicit padding in pixels.
    Explicit {
        /// Rows added above.
        top: usize,
        /// Rows added below.
        bottom: usize,
        /// Columns added on the left.
        left: usize,
        /// Columns added on the right.
        right: usize,
    },
}

impl Padding {
    /// Symmetric explicit padding: `ph` rows above and below, `pw` columns left and right.
    pub fn symmetric(ph: usize, pw: usize) -> Self {
        Padding::Explicit {
            top: ph,
            bottom: ph,
            left: pw,
            right: pw,
        }
    }

    /// Resolves the padding along one axis to (before, after) pixels and the output size.
    fn resolve_axis(
        self,
        axis: Axis,
        input: usize,
        kernel: usize,
        stride: usize,
        dilation: usize,
    ) -> Result<(usize, usize, usize)> {
        let span = (kernel - 1)
            .checked_mul(dilation)
            .and_then(|s| s.checked_add(1))
            .ok_or_else(|| Error::geometry("kernel span overflows"))?;
        let (before, after) = match self {
            Padding::Valid => (0, 0),
            Padding::Same | Padding::SameLower => {
                let out = input.div_ceil(stride);
                let total = ((out - 1) * stride + span).saturating_sub(input);
                let half = total / 2;
                if self == Padding::Same {
                    (half, total - half)
                } else {
                    (total - half, half)
                }
            }
            Padding::Explicit {
                top,
                bottom,
                left,
                right,
            } => match axis {
                Axis::Height => (top, bottom),
                Axis::Width => (left, right),
            },
        };
        let padded = input
            .checked_add(before)
            .and_then(|p| p.checked_add(after))
            .ok_or_else(|| Error::geometry("padded input size overflows"))?;
        if padded < span {
            return Err(Error::geometry(format!(
                "kernel {} span {span} (kernel {kernel}, dilation {dilation}) is larger than the \
                 padded input {} ({input} + {before} + {after})",
                axis.name(),
                axis.name()
            )));
        }
        Ok((before, after, (padded - span) / stride + 1))
    }
}

impl fmt::Display for Padding {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Padding::Valid => write!(f, "valid"),
            Padding::Same => write!(f, "same"),
            Padding::SameLower => write!(f, "same-lower"),
            Padding::Explicit {
                top,
                bottom,
                left,
                right,
            } => write!(f, "{top},{bottom},{left},{right}"),
        }
    }
}

impl FromStr for Padding {
    type Err = Error;

    /// Parses `valid`, `same`, `same-lower`, `P` (all sides), `PH,PW` (symmetric per axis) or
    /// `T,B,L,R`.
    fn from_str(s: &str) -> Result<Self> {
        match s.trim().to_ascii_lowercase().as_str() {
            "valid" => return Ok(Padding::Valid),
            "same" | "same-upper" | "same_upper" => return Ok(Padding::Same),
            "same-lower" | "same_lower" => return Ok(Padding::SameLower),
            _ => {}
        }
        let bad = || {
            Error::invalid(format!(
                "padding '{s}' is not valid, same, same-lower, P, PH,PW or T,B,L,R \
                 (non-negative integers)"
            ))
        };
        let nums: Vec<usize> = s
            .split(',')
            .map(|p| p.trim().parse::<usize>())
            .collect::<std::result::Result<_, _>>()
            .map_err(|_| bad())?;
        match nums[..] {
            [p] => Ok(Padding::symmetric(p, p)),
            [ph, pw] => Ok(Padding::symmetric(ph, pw)),
            [top, bottom, left, right] => Ok(Padding::Explicit {
                top,
                bottom,
                left,
                right,
            }),
            _ => Err(bad()),
        }
    }
}

#[derive(Clone, Copy)]
enum Axis {
    Height,
    Width,
}

impl Axis {
    fn name(self) -> &'static str {
        match self {
            Axis::Height => "height",
            Axis::Width => "width",
        }
    }
}

/// The hyper-parameters of a 2-D convolution, independent of tensor sizes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Conv2dParams {
    /// (vertical, horizontal) stride.
    pub stride: (usize, usize),
    /// (vertical, horizontal) dilation.
    pub dilation: (usize, usize),
    /// Zero padding rule.
    pub padding: Padding,
    /// Number of channel groups (1 = standard, in-channels = depthwise).
    pub groups: usize,
}

impl Default for Conv2dParams {
    fn default() -> Self {
        Conv2dParams {
            stride: (1, 1),
            dilation: (1, 1),
            padding: Padding::Valid,
            groups: 1,
        }
    }
}

impl Conv2dParams {
    /// Default parameters with the given padding.
    pub fn with_padding(padding: Padding) -> Self {
        Conv2dParams {
            padding,
            ..Default::default()
        }
    }

    /// Returns a copy with this stride.
    pub fn stride(mut self, sh: usize, sw: usize) -> Self {
        self.stride = (sh, sw);
        self
    }

    /// Returns a copy with this dilation.
    pub fn dilation(mut self, dh: usize, dw: usize) -> Self {
        self.dilation = (dh, dw);
        self
    }

    /// Returns a copy with this number of groups.
    pub fn groups(mut self, groups: usize) -> Self {
        self.groups = groups;
        self
    }
}

/// A fully resolved 2-D convolution: all sizes, explicit padding and output size.
///
/// Built only through [`ConvGeometry::new`], which validates everything, so kernels receiving
/// one can index without further checks.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ConvGeometry {
    /// Batch size.
    pub batch: usize,
    /// Input channels (all groups).
    pub in_channels: usize,
    /// Input height.
    pub in_h: usize,
    /// Input width.
    pub in_w: usize,
    /// Output channels (all groups).
    pub out_channels: usize,
    /// Kernel height.
    pub kernel_h: usize,
    /// Kernel width.
    pub kernel_w: usize,
    /// Vertical stride.
    pub stride_h: usize,
    /// Horizontal stride.
    pub stride_w: usize,
    /// Vertical dilation.
    pub dilation_h: usize,
    /// Horizontal dilation.
    pub dilation_w: usize,
    /// Zero rows above.
    pub pad_top: usize,
    /// Zero rows below.
    pub pad_bottom: usize,
    /// Zero columns left.
    pub pad_left: usize,
    /// Zero columns right.
    pub pad_right: usize,
    /// Channel groups.
    pub groups: usize,
    /// Output height.
    pub out_h: usize,
    /// Output width.
    pub out_w: usize,
}

impl ConvGeometry {
    /// Validates an input of shape `[batch, in_channels, h, w]` against an OIHW weight of shape
    /// `[out_channels, in_channels / groups, kh, kw]` under `params`.
    pub fn new(input: [usize; 4], weight: [usize; 4], params: &Conv2dParams) -> Result<Self> {
        let [batch, in_channels, in_h, in_w] = input;
        let [out_channels, cin_per_group, kernel_h, kernel_w] = weight;
        let (stride_h, stride_w) = params.stride;
        let (dilation_h, dilation_w) = params.dilation;
        let groups = params.groups;
        for (name, v) in [
            ("input batch", batch),
            ("input channels", in_channels),
            ("input height", in_h),
            ("input width", in_w),
            ("weight out-channels", out_channels),
            ("weight in-channels per group", cin_per_group),
            ("kernel height", kernel_h),
            ("kernel width", kernel_w),
            ("stride", stride_h.min(stride_w)),
            ("dilation", dilation_h.min(dilation_w)),
            ("groups", groups),
        ] {
            if v == 0 {
                return Err(Error::geometry(format!("{name} must be at least 1, got 0")));
            }
        }
        if in_channels % groups != 0 {
            return Err(Error::geometry(format!(
                "input channels {in_channels} are not divisible by groups {groups}"
            )));
        }
        if out_channels % groups != 0 {
            return Err(Error::geometry(format!(
                "weight out-channels {out_channels} are not divisible by groups {groups}"
            )));
        }
        if cin_per_group != in_channels / groups {
            return Err(Error::geometry(format!(
                "weight has {cin_per_group} in-channels per group but the input has \
                 {in_channels} channels in {groups} group(s) ({} per group)",
                in_channels / groups
            )));
        }
        let (pad_top, pad_bottom, out_h) =
            params
                .padding
                .resolve_axis(Axis::Height, in_h, kernel_h, stride_h, dilation_h)?;
        let (pad_left, pad_right, out_w) =
            params
                .padding
                .resolve_axis(Axis::Width, in_w, kernel_w, stride_w, dilation_w)?;
        let g = ConvGeometry {
            batch,
            in_channels,
            in_h,
            in_w,
            out_channels,
            kernel_h,
            kernel_w,
            stride_h,
            stride_w,
            dilation_h,
            dilation_w,
            pad_top,
            pad_bottom,
            pad_left,
            pad_right,
            groups,
            out_h,
            out_w,
        };
        checked_product(&g.input_shape(), "the input")?;
        checked_product(&g.output_shape(), "the output")?;
        checked_product(&g.weight_shape(), "the weight")?;
        // The im2col buffer of one image is the largest scratch the kernels need.
        checked_product(&[g.col_rows(), g.out_h, g.out_w], "the im2col buffer")?;
        Ok(g)
    }

    /// Input shape `[batch, in_channels, in_h, in_w]`.
    pub fn input_shape(&self) -> [usize; 4] {
        [self.batch, self.in_channels, self.in_h, self.in_w]
    }

    /// Weight shape `[out_channels, in_channels / groups, kh, kw]`.
    pub fn weight_shape(&self) -> [usize; 4] {
        [
            self.out_channels,
            self.in_channels_per_group(),
            self.kernel_h,
            self.kernel_w,
        ]
    }

    /// Output shape `[batch, out_channels, out_h, out_w]`.
    pub fn output_shape(&self) -> [usize; 4] {
        [self.batch, self.out_channels, self.out_h, self.out_w]
    }

    /// Input channels per group.
    pub fn in_channels_per_group(&self) -> usize {
        self.in_channels / self.groups
    }

    /// Output channels per group.
    pub fn out_channels_per_group(&self) -> usize {
        self.out_channels / self.groups
    }

    /// Number of input elements.
    pub fn input_len(&self) -> usize {
        self.input_shape().iter().product()
    }

    /// Number of weight elements.
    pub fn weight_len(&self) -> usize {
        self.weight_shape().iter().product()
    }

    /// Number of output elements.
    pub fn output_len(&self) -> usize {
        self.output_shape().iter().product()
    }

    /// Rows of one group's im2col matrix: in-channels per group × kh × kw.
    pub fn col_rows(&self) -> usize {
        self.in_channels_per_group() * self.kernel_h * self.kernel_w
    }

    /// Nominal multiply-accumulates of the forward pass (every tap of every output, padding
    /// included); grad-input and grad-weight take as many.
    pub fn macs(&self) -> u64 {
        (self.batch * self.out_channels) as u64 * self.col_rows() as u64 * self.out_pixels() as u64
    }

    /// Output pixels per channel.
    pub fn out_pixels(&self) -> usize {
        self.out_h * self.out_w
    }

    /// Input pixels per channel.
    pub fn in_pixels(&self) -> usize {
        self.in_h * self.in_w
    }

    /// Whether this is a depthwise convolution: one input channel per group
    /// (depth multiplier = out_channels / in_channels).
    pub fn is_depthwise(&self) -> bool {
        self.groups == self.in_channels && self.in_channels_per_group() == 1
    }

    /// Depth multiplier of a depthwise convolution (output channels per input channel).
    pub fn depth_multiplier(&self) -> usize {
        self.out_channels_per_group()
    }

    /// Whether the im2col matrix is the input itself (1×1 kernel, stride 1, no padding), so the
    /// convolution is a plain matrix product.
    pub fn is_pointwise(&self) -> bool {
        self.kernel_h == 1
            && self.kernel_w == 1
            && self.stride_h == 1
            && self.stride_w == 1
            && self.pad_top == 0
            && self.pad_bottom == 0
            && self.pad_left == 0
            && self.pad_right == 0
    }

    /// The input row read by output row `oh` through kernel row `i`, if it is not padding.
    #[inline]
    pub fn input_row(&self, oh: usize, i: usize) -> Option<usize> {
        (oh * self.stride_h + i * self.dilation_h)
            .checked_sub(self.pad_top)
            .filter(|&r| r < self.in_h)
    }

    /// The input column read by output column `ow` through kernel column `j`, if not padding.
    #[inline]
    pub fn input_col(&self, ow: usize, j: usize) -> Option<usize> {
        (ow * self.stride_w + j * self.dilation_w)
            .checked_sub(self.pad_left)
            .filter(|&c| c < self.in_w)
    }

    /// The kernel rows whose taps from output row `oh` land inside the input (not on padding).
    pub fn valid_kernel_rows(&self, oh: usize) -> std::ops::Range<usize> {
        valid_range(
            self.kernel_h,
            self.dilation_h,
            oh * self.stride_h,
            self.pad_top,
            self.in_h,
        )
    }

    /// The range of output columns whose tap `j` lands inside the input (not on padding).
    pub fn valid_out_cols(&self, j: usize) -> std::ops::Range<usize> {
        valid_range(
            self.out_w,
            self.stride_w,
            j * self.dilation_w,
            self.pad_left,
            self.in_w,
        )
    }

    /// The range of output rows whose tap `i` lands inside the input (not on padding).
    pub fn valid_out_rows(&self, i: usize) -> std::ops::Range<usize> {
        valid_range(
            self.out_h,
            self.stride_h,
            i * self.dilation_h,
            self.pad_top,
            self.in_h,
        )
    }
}

/// Output positions `o` in `0..out` with `0 <= o * stride + offset - pad < input`.
fn valid_range(
    out: usize,
    stride: usize,
    offset: usize,
    pad: usize,
    input: usize,
) -> std::ops::Range<usize> {
    // o * stride >= pad - offset
    let lo = pad.saturating_sub(offset).div_ceil(stride);
    // o * stride + offset - pad <= input - 1  <=>  o * stride <= input - 1 + pad - offset
    let hi = match (input - 1 + pad).checked_sub(offset) {
        Some(m) => (m / stride + 1).min(out),
        None => 0,
    };
    lo.min(hi)..hi
}

/// Parses `N` or `A,B` into a pair (a single value applies to both axes); `what` names the
/// argument in errors. Zero is refused.
pub fn parse_pair(s: &str, what: &str) -> Result<(usize, usize)> {
    let bad = || {
        Error::invalid(format!(
            "{what} '{s}' must be N or NH,NW with integers >= 1"
        ))
    };
    let nums: Vec<usize> = s
        .split(',')
        .map(|p| p.trim().parse::<usize>())
        .collect::<std::result::Result<_, _>>()
        .map_err(|_| bad())?;
    let pair = match nums[..] {
        [a] => (a, a),
        [a, b] => (a, b),
        _ => return Err(bad()),
    };
    if pair.0 == 0 || pair.1 == 0 {
        return Err(bad());
    }
    Ok(pair)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn geom(h: usize, k: usize, s: usize, d: usize, p: Padding) -> Result<ConvGeometry> {
        ConvGeometry::new(
            [1, 1, h, h],
            [1, 1, k, k],
            &Conv2dParams::with_padding(p).stride(s, s).dilation(d, d),
        )
    }

    #[test]
    fn same_padding_matches_tf_rule() {
        // in 5, k 3, s 2: out 3, total = 2*2 + 3 - 5 = 2 -> 1, 1
        let g = geom(5, 3, 2, 1, Padding::Same).unwrap();
        assert_eq!((g.out_h, g.pad_top, g.pad_bottom), (3, 1, 1));
        // in 6, k 3, s 2: out 3, total = 4 + 3 - 6 = 1 -> upper 0,1; lower 1,0
        let g = geom(6, 3, 2, 1, Padding::Same).unwrap();
        assert_eq!((g.out_h, g.pad_top, g.pad_bottom), (3, 0, 1));
        let g = geom(6, 3, 2, 1, Padding::SameLower).unwrap();
        assert_eq!((g.out_h, g.pad_top, g.pad_bottom), (3, 1, 0));
        // even kernel 4, s 1, in 7: total 3 -> 1, 2
        let g = geom(7, 4, 1, 1, Padding::Same).unwrap();
        assert_eq!((g.out_h, g.pad_top, g.pad_bottom), (7, 1, 2));
        // dilation 2, k 3: span 5, in 7 s 1 -> total 4 -> 2,2
        let g = geom(7, 3, 1, 2, Padding::Same).unwrap();
        assert_eq!((g.out_h, g.pad_top, g.pad_bottom), (7, 2, 2));
        // stride larger than kernel: no padding needed, never negative
        let g = geom(7, 1, 3, 1, Padding::Same).unwrap();
        assert_eq!((g.out_h, g.pad_top, g.pad_bottom), (3, 0, 0));
    }

    #[test]
    fn valid_is_floor_rule() {
        let g = geom(15, 3, 1, 1, Padding::Valid).unwrap();
        assert_eq!(g.out_h, 13);
        let g = geom(8, 3, 2, 1, Padding::Valid).unwrap();
        assert_eq!(g.out_h, 3);
    }

    #[test]
    fn rejects_bad_geometry() {
        assert!(geom(2, 3, 1, 1, Padding::Valid).is_err());
        assert!(geom(5, 3, 1, 3, Padding::Valid).is_err()); // span 7 > 5
        assert!(geom(0, 1, 1, 1, Padding::Valid).is_err());
        assert!(geom(5, 3, 0, 1, Padding::Valid).is_err());
        let p = Conv2dParams::default().groups(2);
        assert!(ConvGeometry::new([1, 3, 5, 5], [2, 1, 3, 3], &p).is_err());
        assert!(ConvGeometry::new([1, 4, 5, 5], [3, 2, 3, 3], &p).is_err());
        assert!(ConvGeometry::new([1, 4, 5, 5], [2, 1, 3, 3], &p).is_err());
        assert!(
            ConvGeometry::new(
                [usize::MAX / 2, 4, 5, 5],
                [2, 4, 3, 3],
                &Conv2dParams::default()
            )
            .is_err()
        );
    }

    #[test]
    fn valid_ranges_match_brute_force() {
        for h in 1..9 {
            for k in 1..5 {
                for s in 1..4 {
                    for d in 1..3 {
                        for p in [Padding::Valid, Padding::Same, Padding::symmetric(2, 1)] {
                            let Ok(g) = geom(h, k, s, d, p) else { continue };
                            for i in 0..k {
                                let brute: Vec<usize> = (0..g.out_h)
                                    .filter(|&o| g.input_row(o, i).is_some())
                                    .collect();
                                let r: Vec<usize> = g.valid_out_rows(i).collect();
                                assert_eq!(brute, r, "h{h} k{k} s{s} d{d} {p} i{i}");
                            }
                            for o in 0..g.out_h {
                                let brute: Vec<usize> =
                                    (0..k).filter(|&i| g.input_row(o, i).is_some()).collect();
                                let r: Vec<usize> = g.valid_kernel_rows(o).collect();
                                assert_eq!(brute, r, "h{h} k{k} s{s} d{d} {p} o{o}");
                            }
                        }
                    }
                }
            }
        }
    }

    #[test]
    fn parses_padding() {
        assert_eq!("valid".parse::<Padding>().unwrap(), Padding::Valid);
        assert_eq!("same".parse::<Padding>().unwrap(), Padding::Same);
        assert_eq!("same-lower".parse::<Padding>().unwrap(), Padding::SameLower);
        assert_eq!("1".parse::<Padding>().unwrap(), Padding::symmetric(1, 1));
        assert_eq!(
            "1,2,3,4".parse::<Padding>().unwrap(),
            Padding::Explicit {
                top: 1,
                bottom: 2,
                left: 3,
                right: 4
            }
        );
        assert!("1,2,3".parse::<Padding>().is_err());
        assert!("-1".parse::<Padding>().is_err());
        assert_eq!(parse_pair("2", "stride").unwrap(), (2, 2));
        assert_eq!(parse_pair("2,3", "stride").unwrap(), (2, 3));
        assert!(parse_pair("0", "stride").is_err());
    }
}
