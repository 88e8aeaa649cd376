//! Rotary position embedding of tensors by candle's own ops, so differentiable, on any device:
//! the attention of the tensor-op backend rotates its queries and keys with it, and a prefix's
//! keys go into the training attention rotated back by as much.

use candle_core::{D, Result, Tensor};

/// `x·cos + rotate_half(x)·sin` for `x` `[.., positions, n, dim]` and tables
/// `[positions, 1, rotary]` (or broadcastable), the tables cast to `x`'s dtype as transformers
/// casts them. Only the first `rotary` dimensions rotate; the rest pass through.
pub(crate) fn rotate(x: &Tensor, cos: &Tensor, sin: &Tensor) -> Result<Tensor> {
    partially(x, cos.dim(D::Minus1)?, |x| rotate_all(x, cos, sin))
}

/// `f` applied to the first `rotary` dimensions of `x`, the rest appended unchanged.
fn partially(x: &Tensor, rotary: usize, f: impl Fn(&Tensor) -> Result<Tensor>) -> Result<Tensor> {
    let dim = x.dim(D::Minus1)?;
    if rotary == dim {
        return f(x);
    }
    let rotated = f(&x.narrow(D::Minus1, 0, rotary)?)?;
    Tensor::cat(
        &[&rotated, &x.narrow(D::Minus1, rotary, dim - rotary)?],
        D::Minus1,
    )
}

fn rotate_all(x: &Tensor, cos: &Tensor, sin: &Tensor) -> Result<Tensor> {
    let half = x.dim(D::Minus1)? / 2;
    let (x1, x2) = (
        x.narrow(D::Minus1, 0, half)?,
        x.narrow(D::Minus1, half, half)?,
    );
    let rotated = Tensor::cat(&[&x2.neg()?, &x1], D::Minus1)?;
    let (cos, sin) = (cos.to_dtype(x.dtype())?, sin.to_dtype(x.dtype())?);
    x.broadcast_mul(&cos)? + rotated.broadcast_mul(&sin)?
}

/// The inverse of [`rotate`], a rotation's transpose: `g·cos + rotate_halfᵀ(g·sin)`,
/// `rotate_halfᵀ(z) = (z₂, −z₁)`. So also the gradient of [`rotate`]'s input from its
/// output's `g`.
pub(crate) fn rotate_back(g: &Tensor, cos: &Tensor, sin: &Tensor) -> Result<Tensor> {
    partially(g, cos.dim(D::Minus1)?, |g| rotate_all_back(g, cos, sin))
}

fn rotate_all_back(g: &Tensor, cos: &Tensor, sin: &Tensor) -> Result<Tensor> {
    let (cos, sin) = (cos.to_dtype(g.dtype())?, sin.to_dtype(g.dtype())?);
    let gs = g.broadcast_mul(&sin)?;
    let half = g.dim(D::Minus1)? / 2;
    let (z1, z2) = (
        gs.narrow(D::Minus1, 0, half)?,
        gs.narrow(D::Minus1, half, half)?,
    );
    g.broadcast_mul(&cos)? + Tensor::cat(&[&z2, &z1.neg()?], D::Minus1)?
}
