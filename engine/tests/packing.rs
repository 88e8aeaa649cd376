//! Packed training rows (several examples per row, positions restarting at each, attention
//! kept inside each) compute what each example computes alone: the same logits, and the same
//! adapter gradients, on both backends. The families cover a plain Llama, sliding windows
//! (Gemma 2, Phi-3), and rotations that depend on the sequence's length (Phi-3's LongRoPE,
//! dynamic NTK), where each example is rotated for its own length.

mod common;

use candle_core::{DType, Device, Result, Tensor, Var};
use common::{attach, max_abs_diff, model};
use graft_engine::{
    backend::{Backend, cpu::Cpu, cuda::Cuda},
    models::{Llama, Mode, Positions, Precision},
    rng::Rng,
};

const BACKENDS: [&dyn Backend; 2] = [&Cpu, &Cuda];

/// Two rows of 40: three examples (the CPU backend's query blocks are 32, so one example
/// straddles two), and two examples then padding. Lengths on both sides of the tiny models'
/// original contexts (Phi-3's 9, `llama-dynamic`'s 8) and windows (4, 6).
const ROWS: [&[usize]; 2] = [&[14, 20, 6], &[9, 25]];
const SEQ: usize = 40;

/// Each example's token ids, the same for every model (all tiny vocabularies have ≥ 96).
fn examples() -> Vec<Vec<Vec<u32>>> {
    let mut rng = Rng::seed(5);
    ROWS.iter()
        .map(|row| {
            row.iter()
                .map(|&len| {
                    (0..len)
                        .map(|_| u32::try_from(rng.next_u64() % 96).expect("fits"))
                        .collect()
                })
                .collect()
        })
        .collect()
}

/// The packed rows' ids `[rows, SEQ]`, padded with token 0.
fn packed_ids(examples: &[Vec<Vec<u32>>]) -> Result<Tensor> {
    let mut ids = Vec::new();
    for row in examples {
        let before = ids.len();
        ids.extend(row.iter().flatten());
        ids.resize(before + SEQ, 0);
    }
    Tensor::from_vec(ids, (examples.len(), SEQ), &Device::Cpu)
}

fn lengths() -> Vec<Vec<usize>> {
    ROWS.iter().map(|r| r.to_vec()).collect()
}

/// Logits `[rows, SEQ, vocab]` through every layer with `positions`.
fn logits(llama: &Llama, ids: &Tensor, positions: &Positions, mode: Mode) -> Result<Tensor> {
    let mut h = llama.embed(ids)?;
    for layer in 0..llama.num_layers() {
        h = llama.layer(layer, &h, positions, mode)?;
    }
    llama.head(&h)
}

/// `(row, start, len)` of every example in the packed rows.
fn places() -> Vec<(usize, usize, usize)> {
    let mut places = Vec::new();
    for (row, lengths) in ROWS.iter().enumerate() {
        let mut start = 0;
        for &len in *lengths {
            places.push((row, start, len));
            start += len;
        }
    }
    places
}

#[test]
fn a_packed_row_gives_each_example_its_logits_alone_on_both_backends() -> Result<()> {
    let examples = examples();
    let ids = packed_ids(&examples)?;
    let alone: Vec<&Vec<u32>> = examples.iter().flatten().collect();
    for name in ["llama", "gemma2", "phi3", "llama-dynamic"] {
        for backend in BACKENDS {
            let llama = model(name, Precision::Dense).with_backend(backend);
            let positions = llama.packed_positions(&lengths(), SEQ, &Device::Cpu)?;
            let packed = logits(&llama, &ids, &positions, Mode::Eval)?;
            let unmasked = logits(
                &llama,
                &ids,
                &llama.positions(SEQ, &Device::Cpu)?,
                Mode::Eval,
            )?;
            let mut leaked = 0f32;
            for (&(row, start, len), example) in places().iter().zip(&alone) {
                let own = Tensor::new(example.as_slice(), &Device::Cpu)?.unsqueeze(0)?;
                let expected = llama.forward(&own)?;
                let slice = |t: &Tensor| t.narrow(0, row, 1)?.narrow(1, start, len);
                let diff = max_abs_diff(&slice(&packed)?, &expected);
                assert!(
                    diff < 1e-5,
                    "{name} on {}: example at {row}:{start} differs by {diff}",
                    backend.name()
                );
                leaked = leaked.max(max_abs_diff(&slice(&unmasked)?, &expected));
            }
            assert!(
                leaked > 1e-3,
                "{name}: the same rows unpacked differ from the examples ({leaked})"
            );
        }
    }
    Ok(())
}

/// `Σ logits ⊙ weights` over the real tokens of every example, from the packed rows, and the
/// same sum taken over each example alone: equal values, equal gradients.
#[test]
fn a_packed_rows_adapter_gradients_are_the_examples_gradients_on_both_backends() -> Result<()> {
    let examples = examples();
    let ids = packed_ids(&examples)?;
    let alone: Vec<&Vec<u32>> = examples.iter().flatten().collect();
    for name in ["llama", "gemma2", "phi3", "llama-dynamic"] {
        for backend in BACKENDS {
            let mut llama = model(name, Precision::Dense).with_backend(backend);
            let vars = attach(&mut llama)?;
            let vocab = llama.config().vocab_size;
            let weights = Tensor::randn(0f32, 1.0, (ROWS.len(), SEQ, vocab), &Device::Cpu)?;
            let mut mask = vec![0f32; ROWS.len() * SEQ];
            for &(row, start, len) in &places() {
                mask[row * SEQ + start..][..len].fill(1.0);
            }
            let mask = Tensor::from_vec(mask, (ROWS.len(), SEQ, 1), &Device::Cpu)?;
            let weights = weights.broadcast_mul(&mask)?;

            let positions = llama.packed_positions(&lengths(), SEQ, &Device::Cpu)?;
            let packed_logits = logits(&llama, &ids, &positions, Mode::Train(None))?;
            let packed = (packed_logits * &weights)?.sum_all()?;
            let packed_grads = gradients(&packed, &vars)?;

            let mut total = Tensor::zeros((), DType::F32, &Device::Cpu)?;
            for (&(row, start, len), example) in places().iter().zip(&alone) {
                let own = Tensor::new(example.as_slice(), &Device::Cpu)?.unsqueeze(0)?;
                let w = weights.narrow(0, row, 1)?.narrow(1, start, len)?;
                total = (total + (llama.forward(&own)? * w)?.sum_all()?)?;
            }
            let alone_grads = gradients(&total, &vars)?;

            let (p, a) = (packed.to_scalar::<f32>()?, total.to_scalar::<f32>()?);
            assert!(
                (p - a).abs() <= 1e-4 * a.abs().max(1.0),
                "{name}: {p} vs {a}"
            );
            for (i, (p, a)) in packed_grads.iter().zip(&alone_grads).enumerate() {
                let size: f32 = a.abs()?.max_all()?.to_scalar()?;
                let diff = max_abs_diff(p, a);
                assert!(size > 0.0, "{name} var {i}: a zero gradient");
                assert!(
                    diff <= 1e-5 * size.max(1.0),
                    "{name} on {}: var {i} ({}) differs by {diff} of {size}",
                    backend.name(),
                    if i % 2 == 0 { "A" } else { "B" }
                );
            }
        }
    }
    Ok(())
}

fn gradients(loss: &Tensor, vars: &[Var]) -> Result<Vec<Tensor>> {
    let grads = loss.backward()?;
    Ok(vars
        .iter()
        .map(|v| grads.get(v.as_tensor()).expect("a gradient").clone())
        .collect())
}

#[test]
fn a_packed_row_that_does_not_fit_is_refused() {
    let llama = model("llama", Precision::Dense);
    let error = llama
        .packed_positions(&[vec![30, 20]], SEQ, &Device::Cpu)
        .expect_err("50 tokens in 40");
    assert!(error.to_string().contains("does not fit"), "{error}");
}
