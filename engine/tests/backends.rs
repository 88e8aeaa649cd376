//! The device backend (candle's ops and the CUDA kernels' CPU twins), run here on the CPU,
//! against transformers' logits and against the fused CPU backend's gradients and decoding:
//! the GPU path computes what the tested CPU path computes, before any GPU runs it.

mod common;

use candle_core::{DType, Device, IndexOp, Result, Tensor, Var};
use common::{FAMILIES, max_abs_diff, model, model_on, peft_adapter, reference, tiny};
use graft_engine::{
    adapters::{Lora, ServingAdapter},
    backend::{Backend, KvCache, cpu::Cpu, cuda::Cuda},
    models::{Llama, Precision, Segment},
    rng::Rng,
};

const DEVICE: &dyn Backend = &Cuda;

#[test]
fn the_device_backend_gives_transformers_logits_for_every_family() {
    for name in FAMILIES {
        let llama = model(name, Precision::Dense).with_backend(DEVICE);
        assert_eq!(llama.backend().name(), "cuda");
        let (ids, expected) = reference(&tiny(name));
        let diff = max_abs_diff(&llama.forward(&ids).expect("forward"), &expected);
        assert!(diff < 1e-4, "{name}: logits differ by {diff}");
    }
}

/// Random A and non-zero B on every site of every layer, as `Var`s.
fn attach(model: &mut Llama) -> Result<Vec<Var>> {
    let mut rng = Rng::seed(11);
    let mut vars = Vec::new();
    for layer in 0..model.num_layers() {
        for &site in model.sites() {
            let shape = model.site_shape(site).expect("a site of the model");
            let fresh = Lora::init(4, shape, 2.0, &mut rng, &Device::Cpu)?;
            let b: Vec<f32> = (0..shape.0 * 4).map(|_| rng.uniform(-0.1, 0.1)).collect();
            let (a, b) = (
                Var::from_tensor(&fresh.a)?,
                Var::from_tensor(&Tensor::from_vec(b, (shape.0, 4), &Device::Cpu)?)?,
            );
            model.set_lora(
                layer,
                site,
                Some(Lora {
                    a: a.as_tensor().clone(),
                    b: b.as_tensor().clone(),
                    scale: 2.0,
                    magnitude: None,
                }),
            );
            vars.extend([a, b]);
        }
    }
    Ok(vars)
}

#[test]
fn both_backends_give_the_same_adapter_gradients_dense_and_nf4() -> Result<()> {
    // Mistral: a sliding window; Gemma 2: soft-capped scores, sandwich norms, gelu-tanh;
    // Phi-3: fused projections, partial rotary, LongRoPE.
    for name in ["mistral", "gemma2", "phi3"] {
        same_gradients(name)?;
    }
    Ok(())
}

fn same_gradients(name: &str) -> Result<()> {
    let (ids, _) = reference(&tiny(name));
    for precision in [Precision::Dense, Precision::Nf4] {
        let gradients = |backend: &'static dyn Backend| -> Result<Vec<Tensor>> {
            let mut llama = model(name, precision).with_backend(backend);
            let vars = attach(&mut llama)?;
            let logits = llama.forward(&ids)?;
            let grads = (logits.sqr()?.mean_all()? * 0.01)?.backward()?;
            Ok(vars
                .iter()
                .map(|v| grads.get(v.as_tensor()).expect("a gradient").clone())
                .collect())
        };
        let (cpu, device) = (gradients(&Cpu)?, gradients(DEVICE)?);
        for (i, (c, d)) in cpu.iter().zip(&device).enumerate() {
            let size: f32 = c.abs()?.max_all()?.to_scalar()?;
            let diff = max_abs_diff(c, d);
            assert!(size > 0.0, "{name} {precision:?} var {i}: a zero gradient");
            assert!(
                diff <= 1e-4 * size.max(1.0),
                "{name} {precision:?} var {i}: {diff} of {size}"
            );
        }
    }
    Ok(())
}

#[test]
fn the_device_backend_decodes_a_mixed_batch_as_the_cpu_backend_does() {
    let dir = tiny("llama-peft");
    let adapter = peft_adapter("llama-peft");
    let serving = ServingAdapter::new(&adapter).expect("serving layout");
    let (ids, _) = reference(&dir);
    let row: Vec<u32> = ids.i(0).and_then(|r| r.to_vec1()).expect("ids");
    let decode = |backend: &'static dyn Backend| -> Vec<Tensor> {
        let llama = model("llama", Precision::Dense).with_backend(backend);
        let adapters = [Some(&serving), None];
        let mut caches: Vec<KvCache> = adapters
            .iter()
            .map(|_| KvCache::new(llama.num_layers()))
            .collect();
        let mut logits = Vec::new();
        // A prompt of 3 tokens, then one token per step, two sequences per batch.
        let mut chunks = vec![&row[..3]];
        chunks.extend(row[3..].chunks(1));
        for chunk in chunks {
            let mut segments: Vec<Segment<'_>> = caches
                .iter_mut()
                .zip(adapters)
                .map(|(cache, adapter)| Segment {
                    tokens: chunk,
                    cache,
                    adapter,
                })
                .collect();
            logits.push(llama.forward_packed(&mut segments).expect("step"));
        }
        logits
    };
    let (cpu, device) = (decode(&Cpu), decode(DEVICE));
    for (step, (c, d)) in cpu.iter().zip(&device).enumerate() {
        let diff = max_abs_diff(c, d);
        assert!(diff < 1e-4, "step {step}: {diff}");
    }
    let between = max_abs_diff(&cpu[0].i(0).expect("row"), &cpu[0].i(1).expect("row"));
    assert!(between > 1e-3, "the adapter changes the logits");
}

/// bf16 compute, as on a GPU, stays as near the f32 logits as transformers' own bf16 does:
/// `AutoModelForCausalLM.from_pretrained(dir, dtype=torch.bfloat16)` on these models differs
/// from its f32 logits by 0.44 (llama), 0.14 (llama3), 0.13 (mistral) and 0.23 (qwen2), with
/// logits up to about 6.5 (transformers 5.23, torch 2.15, CPU).
#[test]
fn the_device_backend_in_bf16_stays_as_near_the_f32_logits_as_transformers_does() {
    for name in ["llama", "llama3", "mistral", "qwen2"] {
        let (ids, expected) = reference(&tiny(name));
        let llama = model_on(name, Precision::Dense, &Device::Cpu, DType::BF16);
        assert_eq!(
            llama.backend().name(),
            "cuda",
            "bf16 takes the device backend"
        );
        let logits = llama
            .forward(&ids)
            .and_then(|l| l.to_dtype(DType::F32))
            .expect("forward");
        let diff = max_abs_diff(&logits, &expected);
        assert!(diff < 0.5, "{name}: bf16 differs from f32 by {diff}");
    }
}
