//! Softmax cross-entropy, numerically stable (log-sum-exp with the maximum subtracted).

/// Mean softmax cross-entropy of `logits` ([batch, classes]) against `labels`; writes
/// ∂loss/∂logits into `grad` and returns (mean loss, number of correct argmax predictions).
pub fn softmax_cross_entropy(
    logits: &[f32],
    labels: &[u8],
    classes: usize,
    grad: &mut [f32],
) -> (f64, usize) {
    let batch = labels.len();
    assert_eq!(logits.len(), batch * classes);
    assert_eq!(grad.len(), logits.len());
    let mut loss = 0.0f64;
    let mut correct = 0;
    for ((row, g), &label) in logits
        .chunks_exact(classes)
        .zip(grad.chunks_exact_mut(classes))
        .zip(labels)
    {
        let (arg, max) = argmax(row);
        if arg == label as usize {
            correct += 1;
        }
        let sum: f64 = row.iter().map(|&v| ((v - max) as f64).exp()).sum();
        let log_sum = sum.ln() + max as f64;
        loss += log_sum - row[label as usize] as f64;
        for (k, (o, &v)) in g.iter_mut().zip(row).enumerate() {
            let p = ((v as f64 - log_sum).exp()) as f32;
            *o = (p - if k == label as usize { 1.0 } else { 0.0 }) / batch as f32;
        }
    }
    (loss / batch as f64, correct)
}

/// Index and value of the largest element (the first on ties; NaN counts as largest).
pub fn argmax(row: &[f32]) -> (usize, f32) {
    let mut best = (0, row[0]);
    for (i, &v) in row.iter().enumerate().skip(1) {
        if v > best.1 || (v.is_nan() && !best.1.is_nan()) {
            best = (i, v);
        }
    }
    best
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn matches_closed_form_and_is_stable() {
        // Two classes, logits (0, ln 3): p = (1/4, 3/4); label 1 → loss = −ln(3/4).
        let logits = [0.0, 3f32.ln()];
        let mut g = [0.0; 2];
        let (loss, correct) = softmax_cross_entropy(&logits, &[1], 2, &mut g);
        assert!((loss - (4.0f64 / 3.0).ln()).abs() < 1e-6);
        assert_eq!(correct, 1);
        assert!((g[0] - 0.25).abs() < 1e-6 && (g[1] + 0.25).abs() < 1e-6);
        // Huge logits do not overflow.
        let (loss, _) = softmax_cross_entropy(&[1000.0, 0.0], &[1], 2, &mut g);
        assert!((loss - 1000.0).abs() < 1e-3);
        assert!(g.iter().all(|v| v.is_finite()));
    }
}
