//! The encoders of prompt learning as PEFT defines them: an embedding table of the virtual
//! tokens `[virtual, token_dim]`, then
//! - P-tuning's (`peft.tuners.p_tuning.PromptEncoder`): either an MLP (`Linear(token_dim, h)`,
//!   ReLU, `Linear(h, h)`, ReLU, `Linear(h, token_dim)`) or a two-layer bidirectional LSTM of
//!   hidden size `h` followed by `Linear(2h, 2h)`, ReLU, `Linear(2h, token_dim)`;
//! - prefix tuning's reparameterisation (`peft.tuners.prefix_tuning.PrefixEncoder` with
//!   `prefix_projection`): `Linear(token_dim, h)`, tanh, `Linear(h, out)`, `out` being every
//!   layer's key and value width.
//!
//! Its output is what PEFT saves as `prompt_embeddings`.
//!
//! Written with candle's elementary ops only (matmul, add, exp, tanh, relu, cat), each of which
//! has a backward, so the output is differentiable in every parameter on either backend.
//! Parameters are named as in PEFT's state dict (`embedding.weight`, `mlp_head.0.weight`,
//! `lstm_head.weight_ih_l0_reverse`, …).

use std::collections::HashMap;

use candle_core::{Result, Tensor};

/// Which encoder: P-tuning's (PEFT's `encoder_reparameterization_type`), or prefix tuning's.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum EncoderKind {
    Mlp,
    Lstm,
    /// Prefix tuning's two-layer MLP (PEFT's `prefix_projection`).
    PrefixMlp,
}

impl EncoderKind {
    /// PEFT's name of it.
    pub fn peft_name(self) -> &'static str {
        match self {
            Self::Mlp => "MLP",
            Self::Lstm => "LSTM",
            Self::PrefixMlp => "prefix_projection",
        }
    }

    /// The MLP head's `Sequential` in PEFT's module, and its linear layers by their index.
    fn mlp_layers(self) -> (&'static str, &'static [usize]) {
        match self {
            Self::Mlp => ("mlp_head", &[0, 2, 4]),
            Self::Lstm => ("mlp_head", &[0, 2]),
            Self::PrefixMlp => ("transform", &[0, 2]),
        }
    }
}

/// The LSTM's layers: PEFT's `encoder_num_layers` default, which PEFT's LSTM uses.
const LSTM_LAYERS: usize = 2;

/// A P-tuning encoder's parameters, by PEFT's names.
#[derive(Clone, Debug)]
pub struct PromptEncoder {
    pub kind: EncoderKind,
    pub params: HashMap<String, Tensor>,
}

impl PromptEncoder {
    /// The names of the parameters an encoder of `kind` has.
    pub fn param_names(kind: EncoderKind) -> Vec<String> {
        let mut names = vec!["embedding.weight".to_owned()];
        let (head, layers) = kind.mlp_layers();
        for i in layers {
            names.push(format!("{head}.{i}.weight"));
            names.push(format!("{head}.{i}.bias"));
        }
        if kind == EncoderKind::Lstm {
            for layer in 0..LSTM_LAYERS {
                for suffix in ["", "_reverse"] {
                    for part in ["weight_ih", "weight_hh", "bias_ih", "bias_hh"] {
                        names.push(format!("lstm_head.{part}_l{layer}{suffix}"));
                    }
                }
            }
        }
        names
    }

    /// Each parameter's name and shape, in [`Self::param_names`] order, for `virtual_tokens`
    /// embeddings `token_dim` wide, an encoder of hidden size `hidden` and an output `out`
    /// wide (`token_dim` for P-tuning): PEFT's modules.
    pub fn param_shapes(
        kind: EncoderKind,
        virtual_tokens: usize,
        (token_dim, hidden, out_width): (usize, usize, usize),
    ) -> Vec<(String, Vec<usize>)> {
        // The MLP head's width: the LSTM's output is both directions.
        let wide = match kind {
            EncoderKind::Mlp | EncoderKind::PrefixMlp => hidden,
            EncoderKind::Lstm => 2 * hidden,
        };
        let (head, layers) = kind.mlp_layers();
        let last = layers.last().copied().unwrap_or_default();
        Self::param_names(kind)
            .into_iter()
            .map(|name| {
                let shape = if name == "embedding.weight" {
                    vec![virtual_tokens, token_dim]
                } else if let Some(part) = name.strip_prefix("lstm_head.") {
                    // Gates i, f, g, o stacked; the second layer reads both directions.
                    let input = if part.contains("_l0") {
                        token_dim
                    } else {
                        wide
                    };
                    if part.starts_with("weight_ih") {
                        vec![4 * hidden, input]
                    } else if part.starts_with("weight_hh") {
                        vec![4 * hidden, hidden]
                    } else {
                        vec![4 * hidden]
                    }
                } else {
                    let first = name.starts_with(&format!("{head}.0."));
                    let input = if first && kind != EncoderKind::Lstm {
                        token_dim
                    } else {
                        wide
                    };
                    let out = if name.starts_with(&format!("{head}.{last}.")) {
                        out_width
                    } else {
                        wide
                    };
                    if name.rsplit('.').next() == Some("bias") {
                        vec![out]
                    } else {
                        vec![out, input]
                    }
                };
                (name, shape)
            })
            .collect()
    }

    /// The encoder of `kind` with `params`, refusing a missing or extra name.
    pub fn new(kind: EncoderKind, params: HashMap<String, Tensor>) -> Result<Self> {
        let names = Self::param_names(kind);
        if let Some(missing) = names.iter().find(|n| !params.contains_key(*n)) {
            candle_core::bail!("prompt encoder: no {missing}");
        }
        if let Some(extra) = params.keys().find(|k| !names.contains(k)) {
            candle_core::bail!("prompt encoder ({}): unexpected {extra}", kind.peft_name());
        }
        Ok(Self { kind, params })
    }

    fn param(&self, name: &str) -> Result<&Tensor> {
        self.params
            .get(name)
            .ok_or_else(|| candle_core::Error::Msg(format!("prompt encoder: no {name}")))
    }

    /// `x · Wᵀ + b` for PEFT's `Linear` named `prefix`.
    fn linear(&self, prefix: &str, x: &Tensor) -> Result<Tensor> {
        let w = self.param(&format!("{prefix}.weight"))?;
        let b = self.param(&format!("{prefix}.bias"))?;
        x.matmul(&w.t()?)?.broadcast_add(b)
    }

    /// The encoder's output `[virtual, out]`: P-tuning's virtual tokens' embeddings, or prefix
    /// tuning's keys and values.
    pub fn forward(&self) -> Result<Tensor> {
        let mut x = self.param("embedding.weight")?.clone();
        if self.kind == EncoderKind::Lstm {
            for layer in 0..LSTM_LAYERS {
                let forward = self.lstm_direction(layer, "", &x, false)?;
                let backward = self.lstm_direction(layer, "_reverse", &x, true)?;
                x = Tensor::cat(&[forward, backward], 1)?;
            }
        }
        let (head, layers) = self.kind.mlp_layers();
        for (n, i) in layers.iter().enumerate() {
            x = self.linear(&format!("{head}.{i}"), &x)?;
            if n + 1 < layers.len() {
                x = match self.kind {
                    EncoderKind::PrefixMlp => x.tanh()?,
                    EncoderKind::Mlp | EncoderKind::Lstm => x.relu()?,
                };
            }
        }
        Ok(x)
    }

    /// One direction of one LSTM layer over `x` `[steps, in]`: its hidden states `[steps, h]`
    /// in the order of `x` (PyTorch's gates `i, f, g, o`; the reverse direction reads `x`
    /// from its end). Dropout between layers is a training-time option PEFT defaults to 0.
    fn lstm_direction(
        &self,
        layer: usize,
        suffix: &str,
        x: &Tensor,
        reverse: bool,
    ) -> Result<Tensor> {
        let name = |part: &str| format!("lstm_head.{part}_l{layer}{suffix}");
        let input_weight = self.param(&name("weight_ih"))?;
        let recurrent_weight = self.param(&name("weight_hh"))?;
        let bias = (self.param(&name("bias_ih"))? + self.param(&name("bias_hh"))?)?;
        let hidden = recurrent_weight.dim(1)?;
        // Every step's input projection at once; only the recurrence is sequential.
        let projected = x.matmul(&input_weight.t()?)?.broadcast_add(&bias)?;
        let steps = x.dim(0)?;
        let mut state = Tensor::zeros((1, hidden), x.dtype(), x.device())?;
        let mut cell = state.clone();
        let mut outputs = vec![None; steps];
        let order: Vec<usize> = if reverse {
            (0..steps).rev().collect()
        } else {
            (0..steps).collect()
        };
        for t in order {
            let gates = (projected.narrow(0, t, 1)? + state.matmul(&recurrent_weight.t()?)?)?;
            let gate = |k: usize| gates.narrow(1, k * hidden, hidden);
            let (input, forget) = (sigmoid(&gate(0)?)?, sigmoid(&gate(1)?)?);
            let (candidate, output) = (gate(2)?.tanh()?, sigmoid(&gate(3)?)?);
            cell = ((forget * &cell)? + (input * candidate)?)?;
            state = (output * cell.tanh()?)?;
            outputs[t] = Some(state.clone());
        }
        let outputs: Vec<Tensor> = outputs.into_iter().flatten().collect();
        Tensor::cat(&outputs, 0)
    }
}

/// `1 / (1 + e^(−x))` from elementary ops, which all have a backward.
fn sigmoid(x: &Tensor) -> Result<Tensor> {
    (x.neg()?.exp()? + 1.0)?.recip()
}

#[cfg(test)]
mod tests {
    use candle_core::{DType, Device};

    use super::*;

    #[test]
    fn a_missing_or_extra_parameter_is_named() {
        let zeros = |shape: (usize, usize)| Tensor::zeros(shape, DType::F32, &Device::Cpu);
        let mut params: HashMap<String, Tensor> = PromptEncoder::param_names(EncoderKind::Mlp)
            .into_iter()
            .map(|n| (n, zeros((1, 1)).expect("zeros")))
            .collect();
        assert!(PromptEncoder::new(EncoderKind::Mlp, params.clone()).is_ok());
        let error = PromptEncoder::new(EncoderKind::Lstm, params.clone()).expect_err("no LSTM");
        assert!(error.to_string().contains("lstm_head"), "{error}");
        params.insert(
            "mlp_head.6.weight".to_owned(),
            zeros((1, 1)).expect("zeros"),
        );
        let error = PromptEncoder::new(EncoderKind::Mlp, params).expect_err("extra");
        assert!(error.to_string().contains("mlp_head.6.weight"), "{error}");
    }
}
