//! Memory of a training step on the CPU, measured with a counting allocator: evaluation
//! never needs more than a training step, and the memory model (`graft_trainer::memory`)
//! accounts for what a step of the device backend really allocates. One test, so nothing
//! else allocates while it measures.

#![allow(unsafe_code)] // the counting allocator

use std::{
    alloc::{GlobalAlloc, Layout, System},
    collections::HashMap,
    sync::atomic::{AtomicUsize, Ordering},
};

use candle_core::{DType, Device, Tensor};
use candle_nn::VarBuilder;
use graft_engine::{
    adapters::{AdapterConfig, Site},
    backend::{Dropout, cuda::Cuda},
    models::{Config, Llama, Precision},
    rng::Rng,
};
use graft_trainer::{
    adapters::Adapters,
    backward::{StepOptions, eval_loss_sum, head_loss, micro_step},
    memory::{StepShape, training_step},
    train::{Example, collate},
};

struct Counting;

static CURRENT: AtomicUsize = AtomicUsize::new(0);
static PEAK: AtomicUsize = AtomicUsize::new(0);

// SAFETY: every call is passed to the system allocator unchanged; the counters only observe.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        // SAFETY: the caller's contract is the system allocator's.
        let ptr = unsafe { System.alloc(layout) };
        if !ptr.is_null() {
            let now = CURRENT.fetch_add(layout.size(), Ordering::Relaxed) + layout.size();
            PEAK.fetch_max(now, Ordering::Relaxed);
        }
        ptr
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        // SAFETY: as above.
        unsafe { System.dealloc(ptr, layout) };
        CURRENT.fetch_sub(layout.size(), Ordering::Relaxed);
    }
}

#[global_allocator]
static ALLOCATOR: Counting = Counting;

/// Bytes allocated at the peak of `f` beyond what was allocated when it started.
fn peak_of<R>(f: impl FnOnce() -> R) -> (R, usize) {
    let before = CURRENT.load(Ordering::Relaxed);
    PEAK.store(before, Ordering::Relaxed);
    let result = f();
    (result, PEAK.load(Ordering::Relaxed) - before)
}

/// A model large enough that activations, not bookkeeping, dominate: 4 layers, hidden 128,
/// intermediate 384, 8 heads over 2 key/value heads, random weights; a vocabulary of 512, so
/// that a layer's recomputation, not the loss, is a step's peak (as in a real model).
fn model() -> (Llama, Config) {
    let config = Config::from_json(
        r#"{"architectures": ["LlamaForCausalLM"], "model_type": "llama",
            "hidden_size": 128, "intermediate_size": 384, "num_hidden_layers": 4,
            "num_attention_heads": 8, "num_key_value_heads": 2, "vocab_size": 512,
            "max_position_embeddings": 512, "rms_norm_eps": 1e-5, "tie_word_embeddings": false}"#,
    )
    .expect("config");
    let device = Device::Cpu;
    let mut tensors = HashMap::new();
    let mut add = |name: String, shape: &[usize]| {
        tensors.insert(
            name,
            Tensor::randn(0f32, 0.05, shape, &device).expect("weights"),
        );
    };
    let (h, v) = (128, 512);
    add("model.embed_tokens.weight".into(), &[v, h]);
    add("lm_head.weight".into(), &[v, h]);
    add("model.norm.weight".into(), &[h]);
    for layer in 0..4 {
        for site in Site::SEPARATE {
            let (out, input) = config.site_shape(site).expect("a site of the model");
            add(
                format!("model.layers.{layer}.{}.weight", site.path()),
                &[out, input],
            );
        }
        for norm in ["input_layernorm", "post_attention_layernorm"] {
            add(format!("model.layers.{layer}.{norm}.weight"), &[h]);
        }
    }
    let vb = VarBuilder::from_tensors(tensors, DType::F32, &device);
    (
        Llama::load(&vb, &config, Precision::Nf4).expect("model"),
        config,
    )
}

fn batch(rows: usize, seq: usize) -> Vec<Example> {
    let mut rng = Rng::seed(5);
    (0..rows)
        .map(|_| Example {
            ids: (0..seq)
                .map(|_| u32::try_from(rng.next_u64() % 512).expect("small"))
                .collect(),
            labels: vec![true; seq],
        })
        .collect()
}

#[test]
fn evaluation_stays_within_a_training_step_and_the_model_accounts_for_a_step() {
    let (rows, seq, rank) = (2, 256, 8);
    let examples = batch(rows, seq);
    let dropout = Some(Dropout {
        p: 0.1,
        seed: 3,
        first_row: 0,
    });
    let cases = [(false, false), (true, false), (false, true), (true, true)];
    for (device_backend, use_dora) in cases {
        let (mut model, config) = model();
        if device_backend {
            model = model.with_backend(&Cuda);
        }
        let adapter_config = AdapterConfig {
            use_dora,
            ..AdapterConfig::new(rank, 16.0, 0.1, false, &Site::SEPARATE)
        };
        let adapters =
            Adapters::attach(&mut model, adapter_config, &Site::SEPARATE, 1).expect("adapters");
        let vars = adapters.vars();
        let batch = collate(&examples.iter().collect::<Vec<_>>(), 0, &Device::Cpu).expect("batch");
        let denominator = f64::from(u32::try_from(rows * (seq - 1)).expect("small"));

        let (step, train_peak) = peak_of(|| {
            micro_step(
                &model,
                &vars,
                &batch,
                denominator,
                StepOptions::new(dropout, true),
            )
        });
        drop(step.expect("a training step"));
        let (loss, eval_peak) = peak_of(|| eval_loss_sum(&model, &batch, None));
        let loss = loss.expect("evaluation");
        assert!(loss.is_finite() && loss > 0.0, "{loss}");
        let backend = format!("{}, DoRA {use_dora}", model.backend().name());
        eprintln!("{backend}: training step {train_peak} B, evaluation {eval_peak} B");
        assert!(
            eval_peak <= train_peak,
            "{backend}: evaluation peaked at {eval_peak} B, a training step at {train_peak} B"
        );

        if device_backend {
            let estimate = training_step(
                &config,
                &StepShape {
                    batch: rows,
                    seq,
                    rank,
                    sites: Site::SEPARATE.to_vec(),
                    precision: Precision::Nf4,
                    compute_bytes: 4,
                    dropout: true,
                    dora: use_dora,
                    runtime_bytes: 0,
                },
            );
            // The step's own allocations, and its adapter gradients.
            let adapter_grads = estimate.adapters / 5;
            let predicted = estimate.step() + adapter_grads;
            let measured = train_peak as u64;
            eprintln!(
                "memory model: {predicted} B predicted for a step that peaked at {measured} B"
            );
            assert!(
                estimate.layer_graph + estimate.backward > estimate.loss,
                "the layer's phase is the step's peak here"
            );
            assert!(
                measured <= predicted && predicted <= measured * 3 / 2,
                "the model predicts {predicted} B for a step that peaked at {measured} B:\n{}",
                estimate.table()
            );
            // The loss's phase alone: the whole sequence is one chunk here.
            let h = model.embed(&batch.ids).expect("embed").detach();
            let (result, loss_peak) = peak_of(|| head_loss(&model, &h, &batch, denominator, seq));
            drop(result.expect("the loss"));
            let loss_peak = loss_peak as u64;
            eprintln!(
                "memory model: {} B predicted for the loss, which peaked at {loss_peak} B",
                estimate.loss
            );
            assert!(
                loss_peak <= estimate.loss && estimate.loss <= loss_peak * 3 / 2,
                "the model predicts {} B for the loss's phase, which peaked at {loss_peak} B",
                estimate.loss
            );
        }
    }
}
