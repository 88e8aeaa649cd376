//! The engine's Llama-family forward pass against Hugging Face transformers 5.23 (CPU, f32):
//! `engine/tests/data/tiny/<model>/reference.safetensors` holds input ids and the logits
//! `AutoModelForCausalLM` computed for them (written by `tests/oracle/tiny_models.py`).

use std::path::Path;

use candle_core::{DType, Device, Tensor};
use candle_nn::VarBuilder;
use graft_engine::{
    models::{Config, Llama, Precision, load_weights},
    nf4::Nf4Matrix,
};

fn reference(dir: &Path) -> (Tensor, Tensor) {
    let tensors = candle_core::safetensors::load(dir.join("reference.safetensors"), &Device::Cpu)
        .expect("reference");
    let ids = tensors["input_ids"].to_dtype(DType::U32).expect("ids");
    (ids, tensors["logits"].clone())
}

fn max_abs_diff(a: &Tensor, b: &Tensor) -> f32 {
    (a - b)
        .and_then(|d| d.abs()?.flatten_all()?.max(0)?.to_scalar::<f32>())
        .expect("comparable")
}

#[test]
fn base_logits_match_transformers_within_1e_4() {
    for name in ["llama", "llama3", "qwen2", "mistral"] {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("tests/data/tiny")
            .join(name);
        let config =
            Config::from_json(&std::fs::read_to_string(dir.join("config.json")).expect("config"))
                .expect("config parses");
        let vb = load_weights(&dir, DType::F32, &Device::Cpu).expect("weights");
        let model = Llama::load(&vb, &config, Precision::Dense).expect("model");
        let (ids, expected) = reference(&dir);
        let logits = model.forward(&ids).expect("forward");
        let diff = max_abs_diff(&logits, &expected);
        assert!(diff < 1e-4, "{name}: logits differ by {diff}");
    }
}

#[test]
fn an_nf4_model_computes_what_a_dense_model_of_its_dequantized_weights_does() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/data/tiny/qwen2");
    let config =
        Config::from_json(&std::fs::read_to_string(dir.join("config.json")).expect("config"))
            .expect("config parses");
    let vb = load_weights(&dir, DType::F32, &Device::Cpu).expect("weights");
    let (ids, _) = reference(&dir);
    let nf4 = Llama::load(&vb, &config, Precision::Nf4)
        .expect("model")
        .forward(&ids)
        .expect("forward");

    // The same checkpoint with every projection weight replaced by its NF4 round trip.
    let mut tensors = candle_core::safetensors::load(dir.join("model.safetensors"), &Device::Cpu)
        .expect("weights");
    for (name, tensor) in &mut tensors {
        if name.ends_with("_proj.weight") {
            let shape = tensor.dims2().expect("a matrix");
            let values = tensor
                .flatten_all()
                .and_then(|t| t.to_vec1::<f32>())
                .expect("values");
            let matrix = Nf4Matrix::quantize(&values, shape).expect("quantize");
            *tensor = Tensor::from_vec(matrix.dequantize(), shape, &Device::Cpu).expect("tensor");
        }
    }
    let rounded = VarBuilder::from_tensors(tensors, DType::F32, &Device::Cpu);
    let dense = Llama::load(&rounded, &config, Precision::Dense)
        .expect("model")
        .forward(&ids)
        .expect("forward");
    let (_, original) = reference(&dir);

    assert!(
        max_abs_diff(&nf4, &dense) < 1e-4,
        "NF4 layers compute with their dequantized weights"
    );
    assert!(
        max_abs_diff(&nf4, &original) > 1e-3,
        "and those are not the original weights"
    );
}
