//! The engine's Llama-family forward pass against Hugging Face transformers 5.23 (CPU, f32):
//! `engine/tests/data/tiny/<model>/reference.safetensors` holds input ids and the logits
//! `AutoModelForCausalLM` computed for them (written by `tests/oracle/tiny_models.py`).

mod common;

use candle_core::{DType, Device, Tensor};
use candle_nn::VarBuilder;
use common::{FAMILIES, config, max_abs_diff, model, reference, tiny};
use graft_engine::{
    models::{Llama, Precision},
    quant::Nf4Matrix,
};

#[test]
fn base_logits_match_transformers_within_1e_4() {
    for name in FAMILIES {
        let (ids, expected) = reference(&tiny(name));
        let logits = model(name, Precision::Dense)
            .forward(&ids)
            .expect("forward");
        let diff = max_abs_diff(&logits, &expected);
        assert!(diff < 1e-4, "{name}: logits differ by {diff}");
    }
}

#[test]
fn an_nf4_model_computes_what_a_dense_model_of_its_dequantized_weights_does() {
    let (ids, original) = reference(&tiny("qwen2"));
    let nf4 = model("qwen2", Precision::Nf4)
        .forward(&ids)
        .expect("forward");

    // The same checkpoint with every projection weight replaced by its NF4 round trip.
    let mut tensors =
        candle_core::safetensors::load(tiny("qwen2").join("model.safetensors"), &Device::Cpu)
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
    let dense = Llama::load(&rounded, &config("qwen2"), Precision::Dense)
        .expect("model")
        .forward(&ids)
        .expect("forward");

    assert!(
        max_abs_diff(&nf4, &dense) < 1e-4,
        "NF4 layers compute with their dequantized weights"
    );
    assert!(
        max_abs_diff(&nf4, &original) > 1e-3,
        "and those are not the original weights"
    );
}
