//! References the backends' ops are tested against: candle's own differentiable ops, written
//! out independently of either backend.

use candle_core::{D, Result, Tensor, Var};

use super::Heads;

/// Asserts `fused` and `composed` of `inputs` agree within `tolerance`, and so do the
/// gradients, for every input, of a random weighting of their outputs (within ten times it).
pub fn same_values_and_gradients(
    inputs: &[Tensor],
    fused: impl Fn(&[Tensor]) -> Result<Tensor>,
    composed: impl Fn(&[Tensor]) -> Result<Tensor>,
    tolerance: f32,
) -> Result<()> {
    let vars = inputs
        .iter()
        .map(Var::from_tensor)
        .collect::<Result<Vec<_>>>()?;
    let tensors: Vec<Tensor> = vars.iter().map(|v| v.as_tensor().clone()).collect();
    let (ours, expected) = (fused(&tensors)?, composed(&tensors)?);
    assert_eq!(ours.dims(), expected.dims());
    let diff = max_diff(&ours, &expected)?;
    assert!(diff < tolerance, "values differ by {diff}");
    let weights = Tensor::randn(0f32, 1.0, ours.shape(), ours.device())?;
    let grads = |y: &Tensor| {
        (y.to_dtype(candle_core::DType::F32)? * &weights)?
            .sum_all()?
            .backward()
    };
    let (ours, expected) = (grads(&ours)?, grads(&expected)?);
    for (index, t) in tensors.iter().enumerate() {
        let (o, e) = (ours.get(t), expected.get(t));
        let (Some(o), Some(e)) = (o, e) else {
            panic!("input {index}: a gradient on one side only");
        };
        assert_eq!(o.dims(), e.dims());
        let diff = max_diff(o, e)?;
        assert!(
            diff < tolerance * 10.0,
            "input {index}: gradients differ by {diff}"
        );
    }
    Ok(())
}

/// Softmax over the last dimension from candle's differentiable ops.
pub fn softmax_last_dim(x: &Tensor) -> Result<Tensor> {
    let max = x.max_keepdim(D::Minus1)?.detach();
    let exp = x.broadcast_sub(&max)?.exp()?;
    exp.broadcast_div(&exp.sum_keepdim(D::Minus1)?)
}

/// Causal attention probabilities: scaled scores plus a −∞ mask, then softmax. The queries
/// are the last `q` of the `k` positions.
pub fn reference_causal_softmax(x: &Tensor, scale: f64, window: Option<usize>) -> Result<Tensor> {
    let (q, k) = (x.dim(D::Minus2)?, x.dim(D::Minus1)?);
    let mask: Vec<f32> = (0..q)
        .flat_map(|i| {
            (0..k).map(move |j| {
                let last = k - q + i;
                let visible = j <= last && window.is_none_or(|w| last - j < w);
                if visible { 0.0 } else { f32::NEG_INFINITY }
            })
        })
        .collect();
    let mask = Tensor::from_vec(mask, (q, k), x.device())?;
    softmax_last_dim(&(x * scale)?.broadcast_add(&mask)?)
}

/// Rotary embedding in transformers' (non-interleaved) layout, from candle's ops:
/// `x·cos + rotate_half(x)·sin`, `cos`, `sin` broadcast against `x`; where the tables are
/// narrower than `x`, only that many leading dimensions rotate (transformers' Phi-3).
pub fn reference_rotary(x: &Tensor, cos: &Tensor, sin: &Tensor) -> Result<Tensor> {
    let (dim, rotary) = (x.dim(D::Minus1)?, cos.dim(D::Minus1)?);
    if rotary < dim {
        let rotated = reference_rotary(&x.narrow(D::Minus1, 0, rotary)?, cos, sin)?;
        return Tensor::cat(
            &[&rotated, &x.narrow(D::Minus1, rotary, dim - rotary)?],
            D::Minus1,
        );
    }
    let half = dim / 2;
    let x1 = x.narrow(D::Minus1, 0, half)?;
    let x2 = x.narrow(D::Minus1, half, half)?;
    let rotated = Tensor::cat(&[&x2.neg()?, &x1], D::Minus1)?;
    let (cos, sin) = (cos.to_dtype(x.dtype())?, sin.to_dtype(x.dtype())?);
    x.broadcast_mul(&cos)? + rotated.broadcast_mul(&sin)?
}

/// Causal self-attention from candle's ops, every key/value head repeated for its group:
/// `q` `[batch, seq, heads·dim]`, `k`, `v` `[batch, seq, kv_heads·dim]`.
pub fn reference_attention(
    [q, k, v]: [&Tensor; 3],
    cos: &Tensor,
    sin: &Tensor,
    heads: Heads,
) -> Result<Tensor> {
    let (batch, seq, _) = q.dims3()?;
    let split = |t: &Tensor, n: usize| {
        t.reshape((batch, seq, n, heads.head_dim))?
            .transpose(1, 2)?
            .contiguous()
    };
    let repeat = |t: Tensor| -> Result<Tensor> {
        let times = heads.heads / heads.kv_heads;
        let per_head: Vec<Tensor> = (0..heads.heads)
            .map(|h| t.narrow(1, h / times, 1))
            .collect::<Result<_>>()?;
        Tensor::cat(&per_head, 1)
    };
    let q = reference_rotary(&split(q, heads.heads)?, cos, sin)?;
    let k = repeat(reference_rotary(&split(k, heads.kv_heads)?, cos, sin)?)?;
    let v = repeat(split(v, heads.kv_heads)?)?;
    let scores = q
        .matmul(&k.t()?.contiguous()?)?
        .to_dtype(candle_core::DType::F32)?;
    let probs =
        reference_causal_softmax(&scores, heads.scale, heads.window)?.to_dtype(v.dtype())?;
    probs
        .matmul(&v)?
        .transpose(1, 2)?
        .contiguous()?
        .flatten_from(D::Minus2)
}

pub fn max_diff(a: &Tensor, b: &Tensor) -> Result<f32> {
    (a.to_dtype(candle_core::DType::F32)? - b.to_dtype(candle_core::DType::F32)?)?
        .abs()?
        .flatten_all()?
        .max(0)?
        .to_scalar::<f32>()
}
