//! Shared by the engine's integration tests: the tiny reference models and comparisons.

#![allow(dead_code)] // each test binary uses a subset

use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Result, Tensor, Var};
use graft_engine::{
    adapters::Lora,
    models::{Config, Llama, Precision, load_weights},
    rng::Rng,
};

/// Every tiny checkpoint transformers made (`tests/oracle/tiny_models.py`), one per family
/// or feature the engine must honour.
pub const FAMILIES: [&str; 10] = [
    "llama",
    "llama3",
    "qwen2",
    "mistral",
    "qwen3",
    "gemma3",
    "llama-yarn",
    "gemma2",
    "phi3",
    "llama-dynamic",
];

/// `engine/tests/data/tiny/<name>`. The directory is read at run time, not baked in with `env!`:
/// a shared, cached target directory may hold a binary compiled in another checkout.
pub fn tiny(name: &str) -> PathBuf {
    let manifest_dir = std::env::var_os("CARGO_MANIFEST_DIR")
        .expect("CARGO_MANIFEST_DIR is set: run tests through cargo");
    Path::new(&manifest_dir).join("tests/data/tiny").join(name)
}

pub fn config(name: &str) -> Config {
    let text = std::fs::read_to_string(tiny(name).join("config.json")).expect("config.json");
    Config::from_json(&text).expect("config parses")
}

/// The tiny model `name`, loaded as the engine loads any checkpoint.
pub fn model(name: &str, precision: Precision) -> Llama {
    model_on(name, precision, &Device::Cpu, DType::F32)
}

/// The tiny model `name` on `device`, computing in `dtype`.
pub fn model_on(name: &str, precision: Precision, device: &Device, dtype: DType) -> Llama {
    let vb = load_weights(&tiny(name), dtype, device).expect("weights");
    Llama::load(&vb, &config(name), precision).expect("model")
}

/// Input ids (u32) and logits from `<dir>/reference.safetensors`.
pub fn reference(dir: &Path) -> (Tensor, Tensor) {
    let tensors = candle_core::safetensors::load(dir.join("reference.safetensors"), &Device::Cpu)
        .expect("reference");
    let ids = tensors["input_ids"].to_dtype(DType::U32).expect("ids");
    (ids, tensors["logits"].clone())
}

/// The PEFT adapter in `engine/tests/data/tiny/<name>` (`llama-peft`, …), as the server reads
/// one.
pub fn peft_adapter(name: &str) -> graft_engine::adapters::Adapter {
    let dir = tiny(name);
    let config = std::fs::read(dir.join("adapter_config.json")).expect("config");
    let weights = std::fs::read(dir.join("adapter_model.safetensors")).expect("weights");
    graft_engine::adapters::Adapter::from_bytes(&config, &weights, &Device::Cpu)
        .expect("PEFT's adapter loads")
}

/// For the families whose rotation depends on the sequence's length (`phi3`'s LongRoPE,
/// `llama-dynamic`): transformers' logits for row 0 of the reference fed as a prompt of
/// [`STEPWISE_PREFILL`] tokens and then one token at a time with a cache, `[seq, vocab]`.
pub fn stepwise_reference(name: &str) -> Option<Tensor> {
    let mut tensors =
        candle_core::safetensors::load(tiny(name).join("reference.safetensors"), &Device::Cpu)
            .expect("reference");
    tensors.remove("stepwise_logits")
}

/// The prompt length of [`stepwise_reference`] (`STEPWISE_PREFILL` in tiny_models.py).
pub const STEPWISE_PREFILL: usize = 3;

pub fn max_abs_diff(a: &Tensor, b: &Tensor) -> f32 {
    (a - b)
        .and_then(|d| d.abs()?.flatten_all()?.max(0)?.to_scalar::<f32>())
        .expect("comparable tensors")
}

/// Random A and non-zero B on every site of every layer, as `Var`s.
pub fn attach(model: &mut Llama) -> Result<Vec<Var>> {
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
