//! The CUDA side against the CPU, on a machine with an NVIDIA GPU (built with `--features
//! cuda`; CI compiles these, only a GPU machine runs them — see cuda/README.md):
//! - the NF4 kernel gives the CPU reference's values bit for bit, in f32, bf16 and f16;
//! - the tiny model's logits on the GPU equal the CPU's within 1e-4 in f32, and within 0.5 in
//!   bf16 (transformers' own bf16 logits differ from its f32 ones by 0.13–0.44 on the tiny
//!   models, `engine/tests/backends.rs`);
//! - a served mixed-adapter batch on the GPU (the grouped LoRA path) equals the CPU's.
#![cfg(feature = "cuda")]

mod common;

use candle_core::{DType, Device, Tensor};
use common::{max_abs_diff, model, model_on, reference, tiny};
use graft_engine::{
    adapters::{Adapter, ServingAdapter},
    backend::KvCache,
    models::{Precision, Segment},
    quant::{Nf4Matrix, Nf4Tensor},
    rng::Rng,
};

fn gpu() -> Device {
    Device::new_cuda(0).expect("these tests need an NVIDIA GPU and its driver")
}

fn bits(t: &Tensor) -> Vec<u32> {
    t.to_dtype(DType::F32)
        .and_then(|t| t.flatten_all()?.to_vec1::<f32>())
        .expect("values")
        .into_iter()
        .map(f32::to_bits)
        .collect()
}

#[test]
fn the_nf4_kernel_equals_the_cpu_reference_bit_for_bit() {
    let gpu = gpu();
    let mut rng = Rng::seed(3);
    // A partial last block, an odd count, more than one nested block of 256 scales.
    for shape in [(1, 3), (7, 100), (64, 1000), (4096, 1024)] {
        let weights: Vec<f32> = (0..shape.0 * shape.1)
            .map(|_| rng.uniform(-2.0, 2.0))
            .collect();
        let matrix = Nf4Matrix::quantize(&weights, shape).expect("quantize");
        let cpu = Nf4Tensor::new(&matrix, &Device::Cpu).expect("cpu");
        let cuda = Nf4Tensor::new(&matrix, &gpu).expect("gpu");
        for dtype in [DType::F32, DType::BF16, DType::F16] {
            let expected = cpu.dequantize(dtype).expect("cpu dequantize");
            let actual = cuda.dequantize(dtype).expect("gpu dequantize");
            assert_eq!(actual.dtype(), dtype);
            assert!(actual.device().is_cuda());
            assert_eq!(bits(&actual), bits(&expected), "{shape:?} {dtype:?}");
        }
    }
}

#[test]
fn the_tiny_models_logits_on_the_gpu_equal_the_cpus() {
    let gpu = gpu();
    let (ids, _) = reference(&tiny("llama"));
    for precision in [Precision::Dense, Precision::Nf4] {
        let cpu = model("llama", precision)
            .forward(&ids)
            .expect("cpu forward");
        for (dtype, tolerance) in [(DType::F32, 1e-4), (DType::BF16, 0.5)] {
            let on_gpu = model_on("llama", precision, &gpu, dtype);
            let logits = on_gpu
                .forward(&ids.to_device(&gpu).expect("ids"))
                .and_then(|l| l.to_dtype(DType::F32)?.to_device(&Device::Cpu))
                .expect("gpu forward");
            let diff = max_abs_diff(&logits, &cpu);
            assert!(diff < tolerance, "{precision:?} {dtype:?}: {diff}");
        }
    }
}

#[test]
fn a_mixed_adapter_batch_on_the_gpu_equals_the_cpus() {
    let gpu = gpu();
    let dir = tiny("llama-peft");
    let config = std::fs::read(dir.join("adapter_config.json")).expect("config");
    let weights = std::fs::read(dir.join("adapter_model.safetensors")).expect("weights");
    let adapter = Adapter::from_bytes(&config, &weights, &Device::Cpu).expect("adapter");
    let mut doubled = adapter.clone();
    for lora in doubled.weights.values_mut() {
        lora.b = (&lora.b * 2.0).expect("scaled");
    }
    let prompts: [&[u32]; 4] = [&[1, 5, 9, 2], &[3, 4], &[7, 8, 9, 10, 11], &[2]];
    let run = |device: &Device| -> Tensor {
        let llama = model_on("llama", Precision::Nf4, device, DType::F32);
        let serving = [&adapter, &doubled].map(|a| {
            ServingAdapter::new(a)
                .and_then(|s| s.to(device, DType::F32))
                .expect("serving")
        });
        let choice = [
            Some(&serving[0]),
            None,
            Some(&serving[1]),
            Some(&serving[0]),
        ];
        let mut caches: Vec<KvCache> = prompts
            .iter()
            .map(|_| KvCache::new(llama.num_layers()))
            .collect();
        let mut segments: Vec<Segment<'_>> = prompts
            .iter()
            .zip(caches.iter_mut())
            .zip(choice)
            .map(|((tokens, cache), adapter)| Segment {
                tokens,
                cache,
                adapter,
            })
            .collect();
        llama
            .forward_packed(&mut segments)
            .and_then(|l| l.to_device(&Device::Cpu))
            .expect("packed forward")
    };
    let diff = max_abs_diff(&run(&gpu), &run(&Device::Cpu));
    assert!(diff < 1e-4, "{diff}");
}
