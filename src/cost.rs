//! What a convolution costs: multiply-accumulates (nominal and executed), bias additions,
//! parameters and activation sizes, for the forward pass and each backward product.
//!
//! Units (DESIGN.md): a MAC is one multiply-accumulate; FLOPs = 2 × MACs. *Nominal* MACs =
//! output elements × kh·kw × in-channels-per-group (fvcore/ptflops/thop convention, equal to
//! the textbook's "multiplications" for valid padding). *Executed* MACs skip taps on padding;
//! [`crate::kernels::reference`] counts exactly those, and the tests hold the two together.

use serde::Serialize;

use crate::geometry::ConvGeometry;

/// The cost of one convolution (or a chain of them, summed).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize)]
pub struct ConvCost {
    /// Forward MACs counting every tap, padding included.
    pub forward_macs_nominal: u64,
    /// Forward MACs on taps inside the input.
    pub forward_macs_executed: u64,
    /// Forward bias additions (output elements, if the op has a bias).
    pub bias_adds: u64,
    /// Grad-input MACs, nominal (equal to the forward: it is the adjoint product).
    pub grad_input_macs_nominal: u64,
    /// Grad-input MACs, executed.
    pub grad_input_macs_executed: u64,
    /// Grad-weight MACs, nominal.
    pub grad_weight_macs_nominal: u64,
    /// Grad-weight MACs, executed.
    pub grad_weight_macs_executed: u64,
    /// Grad-bias additions.
    pub grad_bias_adds: u64,
    /// Trainable parameters (weights + bias).
    pub params: u64,
    /// Elements of the input activation.
    pub input_elements: u64,
    /// Elements of intermediate activations (for chains; 0 for one op).
    pub intermediate_elements: u64,
    /// Elements of the output activation.
    pub output_elements: u64,
}

impl ConvCost {
    /// The cost of convolution `g`, with or without a bias.
    pub fn of(g: &ConvGeometry, has_bias: bool) -> Self {
        let b = g.batch as u64;
        let per_tap = b * g.out_channels as u64 * g.in_channels_per_group() as u64;
        let nominal = g.macs();
        // Σ over (output pixel, tap) of "tap inside the input" factorizes over the two axes.
        let rows: u64 = (0..g.kernel_h)
            .map(|i| g.valid_out_rows(i).len() as u64)
            .sum();
        let cols: u64 = (0..g.kernel_w)
            .map(|j| g.valid_out_cols(j).len() as u64)
            .sum();
        let executed = per_tap * rows * cols;
        let out = g.output_len() as u64;
        ConvCost {
            forward_macs_nominal: nominal,
            forward_macs_executed: executed,
            bias_adds: if has_bias { out } else { 0 },
            grad_input_macs_nominal: nominal,
            grad_input_macs_executed: executed,
            grad_weight_macs_nominal: nominal,
            grad_weight_macs_executed: executed,
            grad_bias_adds: if has_bias { out } else { 0 },
            params: g.weight_len() as u64 + if has_bias { g.out_channels as u64 } else { 0 },
            input_elements: g.input_len() as u64,
            intermediate_elements: 0,
            output_elements: out,
        }
    }

    /// The cost of running `first` then `second` (the output of the first is the input of the
    /// second and counts as an intermediate activation).
    pub fn then(self, second: ConvCost) -> Self {
        ConvCost {
            forward_macs_nominal: self.forward_macs_nominal + second.forward_macs_nominal,
            forward_macs_executed: self.forward_macs_executed + second.forward_macs_executed,
            bias_adds: self.bias_adds + second.bias_adds,
            grad_input_macs_nominal: self.grad_input_macs_nominal + second.grad_input_macs_nominal,
            grad_input_macs_executed: self.grad_input_macs_executed
                + second.grad_input_macs_executed,
            grad_weight_macs_nominal: self.grad_weight_macs_nominal
                + second.grad_weight_macs_nominal,
            grad_weight_macs_executed: self.grad_weight_macs_executed
                + second.grad_weight_macs_executed,
            grad_bias_adds: self.grad_bias_adds + second.grad_bias_adds,
            params: self.params + second.params,
            input_elements: self.input_elements,
            intermediate_elements: self.intermediate_elements
                + self.output_elements
                + second.intermediate_elements,
            output_elements: second.output_elements,
        }
    }

    /// Nominal MACs of a training step: forward + grad-input + grad-weight.
    pub fn train_macs_nominal(&self) -> u64 {
        self.forward_macs_nominal + self.grad_input_macs_nominal + self.grad_weight_macs_nominal
    }

    /// Executed MACs of a training step.
    pub fn train_macs_executed(&self) -> u64 {
        self.forward_macs_executed + self.grad_input_macs_executed + self.grad_weight_macs_executed
    }

    /// Bytes of all activations (input, intermediates, output) in f32.
    pub fn activation_bytes(&self) -> u64 {
        4 * (self.input_elements + self.intermediate_elements + self.output_elements)
    }
}

/// The closed-form MAC ratio of a depthwise-separable layer to a standard one with the same
/// kernel and N output channels: 1/N + 1/(kh·kw) (depth multiplier 1, valid padding).
pub fn depthwise_separable_ratio(out_channels: usize, kh: usize, kw: usize) -> f64 {
    1.0 / out_channels as f64 + 1.0 / (kh * kw) as f64
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::geometry::{Conv2dParams, Padding};

    fn cost(input: [usize; 4], weight: [usize; 4], p: Conv2dParams) -> ConvCost {
        ConvCost::of(&ConvGeometry::new(input, weight, &p).unwrap(), false)
    }

    #[test]
    fn textbook_depthwise_separable_example() {
        // 15×15 RGB input, ten 3×3×3 kernels, valid padding.
        let std = cost([1, 3, 15, 15], [10, 3, 3, 3], Conv2dParams::default());
        assert_eq!(std.forward_macs_nominal, 45_630);
        let dw = cost(
            [1, 3, 15, 15],
            [3, 1, 3, 3],
            Conv2dParams::default().groups(3),
        );
        let pw = cost([1, 3, 13, 13], [10, 3, 1, 1], Conv2dParams::default());
        assert_eq!(dw.forward_macs_nominal, 4_563);
        assert_eq!(pw.forward_macs_nominal, 5_070);
        assert_eq!(dw.then(pw).forward_macs_nominal, 9_633);
        // Valid padding: nominal = executed.
        assert_eq!(std.forward_macs_executed, std.forward_macs_nominal);
    }

    #[test]
    fn textbook_sobel_example() {
        let std = cost([1, 1, 15, 15], [1, 1, 3, 3], Conv2dParams::default());
        assert_eq!(std.forward_macs_nominal, 1_521);
        let col = cost([1, 1, 15, 15], [1, 1, 3, 1], Conv2dParams::default());
        let row = cost([1, 1, 13, 15], [1, 1, 1, 3], Conv2dParams::default());
        assert_eq!(col.forward_macs_nominal, 585);
        assert_eq!(row.forward_macs_nominal, 507);
        assert_eq!(col.then(row).forward_macs_nominal, 1_092);
    }

    #[test]
    fn executed_skips_padding() {
        // 3×3 same on 3×3: the centre pixel uses 9 taps, edges 6, corners 4 → 4·4 + 4·6 + 9 = 49.
        let c = cost(
            [1, 1, 3, 3],
            [1, 1, 3, 3],
            Conv2dParams::with_padding(Padding::Same),
        );
        assert_eq!(c.forward_macs_nominal, 81);
        assert_eq!(c.forward_macs_executed, 49);
    }

    #[test]
    fn closed_form_ratio() {
        assert!((depthwise_separable_ratio(10, 3, 3) - (0.1 + 1.0 / 9.0)).abs() < 1e-12);
    }
}
