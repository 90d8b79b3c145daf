//! Optimizers with PyTorch's update rules: SGD (momentum, Nesterov, weight decay), Adam (L2
//! weight decay added to the gradient) and AdamW (decoupled weight decay); and the learning-rate
//! schedules (constant, cosine annealing to 0 over all steps).

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};
use crate::nn::Param;

/// Which optimizer.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum OptimizerKind {
    /// Stochastic gradient descent.
    Sgd,
    /// Adam.
    Adam,
    /// Adam with decoupled weight decay.
    Adamw,
}

impl FromStr for OptimizerKind {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        match s.to_ascii_lowercase().as_str() {
            "sgd" => Ok(OptimizerKind::Sgd),
            "adam" => Ok(OptimizerKind::Adam),
            "adamw" => Ok(OptimizerKind::Adamw),
            _ => Err(Error::invalid(format!(
                "unknown optimizer '{s}' (sgd, adam or adamw)"
            ))),
        }
    }
}

impl fmt::Display for OptimizerKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            OptimizerKind::Sgd => "sgd",
            OptimizerKind::Adam => "adam",
            OptimizerKind::Adamw => "adamw",
        })
    }
}

/// Optimizer hyper-parameters.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
pub struct OptimizerConfig {
    /// Which optimizer.
    pub kind: OptimizerKind,
    /// Base learning rate.
    pub lr: f32,
    /// SGD momentum (0 = none).
    pub momentum: f32,
    /// Nesterov momentum (SGD).
    pub nesterov: bool,
    /// Weight decay (L2 for SGD/Adam, decoupled for AdamW).
    pub weight_decay: f32,
    /// Adam β1.
    pub beta1: f32,
    /// Adam β2.
    pub beta2: f32,
    /// Adam ε.
    pub eps: f32,
}

impl OptimizerConfig {
    /// Defaults for `kind` with learning rate `lr` (AdamW: weight decay 0.01, as PyTorch).
    pub fn new(kind: OptimizerKind, lr: f32) -> Self {
        OptimizerConfig {
            kind,
            lr,
            momentum: 0.0,
            nesterov: false,
            weight_decay: if kind == OptimizerKind::Adamw {
                0.01
            } else {
                0.0
            },
            beta1: 0.9,
            beta2: 0.999,
            eps: 1e-8,
        }
    }

    /// Checks ranges.
    pub fn validate(&self) -> Result<()> {
        if !(self.lr > 0.0 && self.lr.is_finite()) {
            return Err(Error::invalid(format!(
                "--lr must be a positive number, got {}",
                self.lr
            )));
        }
        if !(0.0..1.0).contains(&self.momentum) || self.weight_decay < 0.0 {
            return Err(Error::invalid(
                "--momentum must be in [0, 1) and --weight-decay >= 0",
            ));
        }
        if self.nesterov && self.momentum == 0.0 {
            return Err(Error::invalid("--nesterov needs --momentum > 0"));
        }
        Ok(())
    }
}

/// Learning-rate schedule over the whole run.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Schedule {
    /// The base rate throughout.
    Constant,
    /// Cosine annealing from the base rate to 0 over all steps (PyTorch `CosineAnnealingLR`
    /// with `T_max` = total steps, stepped after every batch).
    Cosine,
}

impl FromStr for Schedule {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        match s.to_ascii_lowercase().as_str() {
            "constant" | "none" => Ok(Schedule::Constant),
            "cosine" => Ok(Schedule::Cosine),
            _ => Err(Error::invalid(format!(
                "unknown schedule '{s}' (cosine or constant)"
            ))),
        }
    }
}

impl Schedule {
    /// The learning rate for step `step` (0-based) of `total`.
    pub fn lr(&self, base: f32, step: u64, total: u64) -> f32 {
        match self {
            Schedule::Constant => base,
            Schedule::Cosine => {
                let t = (step as f64 / total.max(1) as f64).min(1.0);
                (base as f64 * 0.5 * (1.0 + (std::f64::consts::PI * t).cos())) as f32
            }
        }
    }
}

/// Optimizer state: per-parameter buffers (momentum, or Adam's first and second moments).
#[derive(Clone, Debug)]
pub struct Optimizer {
    /// Hyper-parameters.
    pub config: OptimizerConfig,
    /// Steps taken.
    pub step: u64,
    /// First buffer per parameter (SGD momentum or Adam m).
    pub m: Vec<Vec<f32>>,
    /// Second buffer per parameter (Adam v; empty for SGD).
    pub v: Vec<Vec<f32>>,
}

impl Optimizer {
    /// Fresh state for parameters of these sizes.
    pub fn new(config: OptimizerConfig, sizes: &[usize]) -> Self {
        let adam = config.kind != OptimizerKind::Sgd;
        Optimizer {
            config,
            step: 0,
            m: sizes.iter().map(|&n| vec![0.0; n]).collect(),
            v: sizes
                .iter()
                .map(|&n| if adam { vec![0.0; n] } else { Vec::new() })
                .collect(),
        }
    }

    /// One update of every parameter with learning rate `lr`.
    pub fn update(&mut self, params: &mut [&mut Param], lr: f32) {
        assert_eq!(params.len(), self.m.len(), "parameter count changed");
        self.step += 1;
        let c = self.config;
        let t = self.step as i32;
        for ((p, m), v) in params.iter_mut().zip(&mut self.m).zip(&mut self.v) {
            match c.kind {
                OptimizerKind::Sgd => {
                    for ((w, &g), buf) in p.value.iter_mut().zip(&p.grad).zip(m.iter_mut()) {
                        let mut d = g + c.weight_decay * *w;
                        if c.momentum > 0.0 {
                            // PyTorch: the first step's buffer is the gradient itself.
                            *buf = if t == 1 { d } else { c.momentum * *buf + d };
                            d = if c.nesterov {
                                d + c.momentum * *buf
                            } else {
                                *buf
                            };
                        }
                        *w -= lr * d;
                    }
                }
                OptimizerKind::Adam | OptimizerKind::Adamw => {
                    let bc1 = 1.0 - c.beta1.powi(t);
                    let bc2_sqrt = (1.0 - c.beta2.powi(t)).sqrt();
                    let step_size = lr / bc1;
                    let decoupled = c.kind == OptimizerKind::Adamw;
                    for (((w, &g), mi), vi) in p
                        .value
                        .iter_mut()
                        .zip(&p.grad)
                        .zip(m.iter_mut())
                        .zip(v.iter_mut())
                    {
                        let g = if decoupled {
                            *w *= 1.0 - lr * c.weight_decay;
                            g
                        } else {
                            g + c.weight_decay * *w
                        };
                        *mi = c.beta1 * *mi + (1.0 - c.beta1) * g;
                        *vi = c.beta2 * *vi + (1.0 - c.beta2) * g * g;
                        *w -= step_size * *mi / (vi.sqrt() / bc2_sqrt + c.eps);
                    }
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn param(v: f32, g: f32) -> Param {
        Param {
            name: "w",
            shape: vec![1],
            value: vec![v],
            grad: vec![g],
        }
    }

    #[test]
    fn adam_first_step_moves_by_lr() {
        // Bias correction makes Adam's first step lr · sign(g) (up to eps).
        let mut p = param(1.0, 0.5);
        let mut o = Optimizer::new(OptimizerConfig::new(OptimizerKind::Adam, 0.1), &[1]);
        o.update(&mut [&mut p], 0.1);
        assert!((p.value[0] - 0.9).abs() < 1e-6);
    }

    #[test]
    fn sgd_momentum_and_nesterov_follow_pytorch() {
        let mut cfg = OptimizerConfig::new(OptimizerKind::Sgd, 0.1);
        cfg.momentum = 0.9;
        let mut p = param(0.0, 1.0);
        let mut o = Optimizer::new(cfg, &[1]);
        o.update(&mut [&mut p], 0.1); // buf = 1, w = -0.1
        o.update(&mut [&mut p], 0.1); // buf = 1.9, w = -0.29
        assert!((p.value[0] + 0.29).abs() < 1e-6);
        cfg.nesterov = true;
        let mut p = param(0.0, 1.0);
        let mut o = Optimizer::new(cfg, &[1]);
        o.update(&mut [&mut p], 0.1); // buf = 1, d = 1 + 0.9 = 1.9, w = -0.19
        assert!((p.value[0] + 0.19).abs() < 1e-6);
    }

    #[test]
    fn adamw_decays_weights_decoupled() {
        let mut cfg = OptimizerConfig::new(OptimizerKind::Adamw, 0.1);
        cfg.weight_decay = 0.5;
        let mut p = param(2.0, 0.0);
        let mut o = Optimizer::new(cfg, &[1]);
        o.update(&mut [&mut p], 0.1);
        assert!((p.value[0] - 2.0 * (1.0 - 0.05)).abs() < 1e-6);
    }

    #[test]
    fn cosine_schedule_ends_at_zero() {
        let s = Schedule::Cosine;
        assert_eq!(s.lr(1.0, 0, 100), 1.0);
        assert!((s.lr(1.0, 50, 100) - 0.5).abs() < 1e-6);
        assert!(s.lr(1.0, 100, 100).abs() < 1e-6);
    }
}
