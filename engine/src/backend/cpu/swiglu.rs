//! The gated activation of Llama's MLP on the CPU in f32.

use candle_core::{CpuStorage, CustomOp2, Layout, Result, Shape, Tensor};

use super::{
    gemm::{f32_values, with_f32s},
    math::{sigmoid, vectorized},
};

/// `silu(gate) · up`, `silu(x) = x · sigmoid(x)`, as one op whose backward is
/// `dgate = g · up · σ(gate) · (1 + gate · (1 − σ(gate)))`, `dup = g · silu(gate)`.
pub fn swiglu(gate: &Tensor, up: &Tensor) -> Result<Tensor> {
    gate.contiguous()?.apply_op2(&up.contiguous()?, SwiGlu)
}

struct SwiGlu;

impl CustomOp2 for SwiGlu {
    fn name(&self) -> &'static str {
        "swiglu"
    }

    fn cpu_fwd(
        &self,
        gate: &CpuStorage,
        gate_layout: &Layout,
        up: &CpuStorage,
        up_layout: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let gate = f32_values(gate, gate_layout, self.name())?;
        let up = f32_values(up, up_layout, self.name())?;
        if gate.len() != up.len() {
            candle_core::bail!("{}: gate and up differ in shape", self.name());
        }
        let mut out = vec![0f32; gate.len()];
        vectorized(
            #[inline(always)]
            || {
                for ((o, &g), &u) in out.iter_mut().zip(gate).zip(up) {
                    *o = g * sigmoid(g) * u;
                }
            },
        );
        Ok((CpuStorage::F32(out), gate_layout.shape().clone()))
    }

    fn bwd(
        &self,
        gate: &Tensor,
        up: &Tensor,
        _: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let (d_gate, d_up) = with_f32s([gate, up, grad], self.name(), |[gate, up, grad]| {
            let mut d_gate = vec![0f32; gate.len()];
            let mut d_up = vec![0f32; gate.len()];
            let (d_gate_values, d_up_values) = (d_gate.as_mut_slice(), d_up.as_mut_slice());
            vectorized(
                #[inline(always)]
                || {
                    let outputs = d_gate_values.iter_mut().zip(d_up_values.iter_mut());
                    let inputs = gate.iter().zip(up).zip(grad);
                    for ((d_gate, d_up), ((&g, &u), &grad)) in outputs.zip(inputs) {
                        let s = sigmoid(g);
                        *d_gate = grad * u * s * (1.0 + g * (1.0 - s));
                        *d_up = grad * g * s;
                    }
                },
            );
            Ok((d_gate, d_up))
        })?;
        Ok((
            Some(Tensor::from_vec(d_gate, gate.shape(), gate.device())?),
            Some(Tensor::from_vec(d_up, up.shape(), up.device())?),
        ))
    }
}

#[cfg(test)]
mod tests {
    use candle_core::Device;

    use super::*;
    use crate::backend::{check::same_values_and_gradients, cuda::composed_swiglu};

    #[test]
    fn the_fused_activation_equals_the_composed_one_with_the_same_gradient() -> Result<()> {
        let device = Device::Cpu;
        let gate = Tensor::randn(0f32, 3.0, (2, 5, 12), &device)?;
        let up = Tensor::randn(0f32, 1.0, (2, 5, 12), &device)?;
        same_values_and_gradients(
            &[gate, up],
            |t| swiglu(&t[0], &t[1]),
            |t| composed_swiglu(&t[0], &t[1]),
            1e-5,
        )
    }
}
