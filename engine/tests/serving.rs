//! The server's forward pass: packed segments with KV caches and per-sequence adapters give
//! the logits of the training forward (and so of transformers + PEFT), one step at a time.

mod common;

use candle_core::{Device, IndexOp, Tensor};
use common::{
    FAMILIES, STEPWISE_PREFILL, max_abs_diff, model, peft_adapter, reference, stepwise_reference,
    tiny,
};
use graft_engine::{
    adapters::{Adapter, Ia3Adapter, PeftAdapter},
    backend::KvCache,
    models::{Llama, Precision, Segment},
};

/// The families with a PEFT-made adapter: the model and the adapter's directory.
const WITH_PEFT: [(&str, &str); 8] = [
    ("llama", "llama-peft"),
    ("llama", "llama-peft-patterns"),
    ("qwen3", "qwen3-peft"),
    ("gemma3", "gemma3-peft"),
    ("gemma2", "gemma2-peft"),
    ("phi3", "phi3-peft"),
    // DoRA, on a model whose q/k/v have a bias, and on fused projections.
    ("qwen2", "qwen2-peft-dora"),
    ("phi3", "phi3-peft-dora"),
];

/// The same adapter with every B doubled: a second, different adapter of the same shape.
fn doubled(adapter: &Adapter) -> Adapter {
    let mut other = adapter.clone();
    for lora in other.weights.values_mut() {
        lora.b = (&lora.b * 2.0).expect("scaled");
    }
    other
}

fn ids_row(ids: &Tensor, row: usize) -> Vec<u32> {
    ids.i(row).expect("row").to_vec1::<u32>().expect("u32 ids")
}

/// Logits of every position of `ids`, fed as a prompt of `prefill` tokens and then one token
/// per step.
fn stepwise(model: &Llama, adapter: Option<&Adapter>, ids: &[u32], prefill: usize) -> Tensor {
    let serving = adapter.map(|a| model.serving_adapter(a).expect("serving layout"));
    let adapter = serving.as_ref();
    let mut cache = KvCache::new(model.num_layers());
    let mut rows = Vec::new();
    let mut chunks = vec![&ids[..prefill]];
    chunks.extend(ids[prefill..].chunks(1));
    for chunk in chunks {
        let mut segment = [Segment {
            tokens: chunk,
            cache: &mut cache,
            adapter,
        }];
        rows.push(model.forward_packed(&mut segment).expect("forward_packed"));
    }
    assert_eq!(cache.len(), ids.len());
    Tensor::cat(&rows, 0).expect("cat")
}

/// Logits `[seq, vocab]` of the training forward over one row.
fn full_forward(model: &Llama, row: &[u32]) -> Tensor {
    let ids = Tensor::new(row, &Device::Cpu)
        .and_then(|t| t.unsqueeze(0))
        .expect("ids");
    model
        .forward(&ids)
        .and_then(|l| l.squeeze(0))
        .expect("forward")
}

#[test]
fn decoding_with_a_cache_gives_pefts_logits_at_every_position() {
    for (name, peft) in WITH_PEFT {
        let adapter = peft_adapter(peft);
        let base = model(name, Precision::Dense);
        let (ids, expected) = reference(&tiny(peft));
        let row = ids_row(&ids, 0);
        let prefill = 3;
        let ours = stepwise(&base, Some(&adapter), &row, prefill);
        let expected = expected
            .i(0)
            .expect("row")
            .narrow(0, prefill - 1, row.len() - prefill + 1)
            .expect("positions");
        let diff = max_abs_diff(&ours, &expected);
        assert!(diff < 1e-4, "{name}: logits differ from PEFT's by {diff}");
    }
}

#[test]
fn every_family_decodes_as_its_full_forward() {
    for name in FAMILIES
        .into_iter()
        .filter(|n| stepwise_reference(n).is_none())
    {
        let model = model(name, Precision::Dense);
        let (ids, _) = reference(&tiny(name));
        let row = ids_row(&ids, 0);
        let full = full_forward(&model, &row);
        let ours = stepwise(&model, None, &row, 1);
        let diff = max_abs_diff(&ours, &full);
        assert!(diff < 1e-4, "{name}: cached decoding differs by {diff}");
    }
}

/// Where the rotation depends on the sequence's length, decoding a sequence past the original
/// context changes it mid-way: each step rotates with the length the sequence has then, as
/// transformers' `generate` does, and the logits are its step by step.
#[test]
fn length_dependent_rope_decodes_as_transformers_generates() {
    let mut checked = 0;
    for name in FAMILIES {
        let Some(expected) = stepwise_reference(name) else {
            continue;
        };
        let model = model(name, Precision::Dense);
        let (ids, _) = reference(&tiny(name));
        let row = ids_row(&ids, 0);
        let ours = stepwise(&model, None, &row, STEPWISE_PREFILL);
        let expected = expected
            .narrow(0, STEPWISE_PREFILL - 1, row.len() - STEPWISE_PREFILL + 1)
            .expect("positions");
        let diff = max_abs_diff(&ours, &expected);
        assert!(diff < 1e-4, "{name}: stepwise logits differ by {diff}");
        // The full forward rotates every position as the whole sequence: not what decoding saw.
        let full = full_forward(&model, &row)
            .narrow(0, STEPWISE_PREFILL - 1, row.len() - STEPWISE_PREFILL + 1)
            .expect("positions");
        assert!(
            max_abs_diff(&full, &expected) > 1e-3,
            "{name}: the test needs a sequence that crosses the original context"
        );
        checked += 1;
    }
    assert_eq!(checked, 2, "phi3 and llama-dynamic");
}

#[test]
fn a_mixed_batch_gives_each_sequence_what_it_gets_alone() {
    for (name, peft) in WITH_PEFT {
        let first = peft_adapter(peft);
        let second = doubled(&first);
        mixed_batch(name, peft, &lora(first), &lora(second));
    }
}

/// Adapters of different ranks per projection (rank 4 everywhere beside `rank_pattern`'s 8, 6
/// and 2) in one batch.
#[test]
fn adapters_of_different_ranks_share_a_batch() {
    let (plain, patterned) = (
        peft_adapter("llama-peft"),
        peft_adapter("llama-peft-patterns"),
    );
    mixed_batch("llama", "llama-peft", &lora(plain), &lora(patterned));
}

/// DoRA rows, plain LoRA rows (the same pairs without their magnitudes) and base rows in one
/// batch: each as it is alone, so DoRA's rescaling stays on its own rows.
#[test]
fn dora_plain_lora_and_base_rows_share_a_batch() {
    let dora = peft_adapter("qwen2-peft-dora");
    let mut plain = dora.clone();
    plain.config.use_dora = false;
    for lora in plain.weights.values_mut() {
        lora.magnitude = None;
    }
    mixed_batch("qwen2", "qwen2-peft-dora", &lora(dora), &lora(plain));
}

/// (IA)³ rows (PEFT's adapter for Llama: output vectors on k/v, an input vector on
/// `down_proj`), LoRA rows and base rows in one batch; and on Qwen2 two (IA)³ adapters.
#[test]
fn ia3_lora_and_base_rows_share_a_batch() {
    let ia3 = read_peft;
    mixed_batch(
        "llama",
        "llama-peft-ia3",
        &ia3("llama-peft-ia3"),
        &lora(peft_adapter("llama-peft")),
    );
    let PeftAdapter::Ia3(first) = ia3("qwen2-peft-ia3") else {
        panic!("an (IA)³ adapter")
    };
    let squared = Ia3Adapter {
        vectors: first
            .vectors
            .iter()
            .map(|(&key, v)| {
                let mut v = v.clone();
                v.vector = v.vector.sqr().expect("squared");
                (key, v)
            })
            .collect(),
        ..first.clone()
    };
    mixed_batch(
        "qwen2",
        "qwen2-peft-ia3",
        &PeftAdapter::Ia3(first),
        &PeftAdapter::Ia3(squared),
    );
}

fn read_peft(name: &str) -> PeftAdapter {
    let dir = tiny(name);
    let read = |file: &str| std::fs::read(dir.join(file)).expect("file");
    PeftAdapter::from_bytes(
        &read("adapter_config.json"),
        &read("adapter_model.safetensors"),
        &Device::Cpu,
    )
    .expect("PEFT's adapter loads")
}

/// Prompt-learning adapters served: their virtual tokens' keys and values computed once when
/// laid out (prompt tuning on Llama and Gemma 3, P-tuning's MLP and LSTM), or taken as they are
/// (prefix tuning on Llama, and on Qwen3 with PEFT's reparameterisation MLP and grouped-query
/// attention); a sequence started from them and fed its prompt in chunks gives PEFT's logits
/// at every position of the input; the cache then holds the virtual tokens and the input. The
/// prefixes also go through the tensor-op path other devices run (in f64 here).
#[test]
fn prompt_adapters_serve_from_their_virtual_prefix_as_peft() {
    use candle_core::DType;
    use graft_engine::models::{Config, load_weights};
    for (name, dir) in [
        ("llama", "llama-peft-prompt"),
        ("llama", "llama-peft-ptuning-mlp"),
        ("llama", "llama-peft-ptuning-lstm"),
        ("gemma3", "gemma3-peft-prompt"),
        ("llama", "llama-peft-prefix"),
        ("qwen3", "qwen3-peft-prefix-projection"),
    ] {
        let f64_model = || {
            let text = std::fs::read_to_string(tiny(name).join("config.json")).expect("config");
            let config = Config::from_json(&text).expect("parses");
            let vb = load_weights(&tiny(name), DType::F64, &Device::Cpu).expect("weights");
            Llama::load(&vb, &config, Precision::Dense).expect("f64 model")
        };
        let prefix = dir.contains("prefix");
        let models = if prefix {
            vec![model(name, Precision::Dense), f64_model()]
        } else {
            vec![model(name, Precision::Dense)]
        };
        let adapter = read_peft(dir);
        let PeftAdapter::Prompt(prompt) = &adapter else {
            panic!("{dir} holds virtual tokens")
        };
        let (ids, expected) = reference(&tiny(dir));
        for model in &models {
            model.check(&adapter).expect("fits");
            let serving = model.serving(&adapter).expect("layout");
            assert_eq!(serving.virtual_len(), prompt.num_virtual_tokens());
            for row in 0..ids.dim(0).expect("rows") {
                let tokens = ids_row(&ids, row);
                let mut cache = serving.virtual_prefix().expect("a prefix").clone();
                let mut chunks = vec![3];
                chunks.extend(std::iter::repeat_n(1, tokens.len() - 3));
                let logits = feed(model, &mut cache, &tokens, &chunks)
                    .to_dtype(DType::F32)
                    .expect("f32");
                let diff = max_abs_diff(&logits, &expected.i(row).expect("row"));
                eprintln!(
                    "{dir} ({:?}) row {row}: max abs diff {diff:.3e}",
                    model.dtype()
                );
                assert!(
                    diff < 1e-4,
                    "{dir} row {row}: served logits differ by {diff}"
                );
                assert_eq!(cache.len(), prompt.num_virtual_tokens() + tokens.len());
            }
        }
    }
}

/// A prefix for another model's layers or keys' width is refused, naming both.
#[test]
fn a_prefix_for_another_shape_is_refused() {
    let adapter = read_peft("qwen3-peft-prefix-projection");
    let error = model("llama", Precision::Dense)
        .check(&adapter)
        .expect_err("Qwen3's prefix on Llama");
    assert!(error.to_string().contains("kv_heads × head_dim"), "{error}");
}

/// One batch mixes a prompt-tuning sequence, a LoRA one and the base: each gets what it gets
/// alone.
#[test]
fn prompt_lora_and_base_rows_share_a_batch() {
    mixed_batch(
        "llama",
        "llama-peft",
        &read_peft("llama-peft-prompt"),
        &lora(peft_adapter("llama-peft")),
    );
}

fn lora(adapter: Adapter) -> PeftAdapter {
    PeftAdapter::Lora(adapter)
}

fn mixed_batch(name: &str, peft: &str, first: &PeftAdapter, second: &PeftAdapter) {
    let model = model(name, Precision::Dense);
    let (first_s, second_s) = (
        model.serving(first).expect("layout"),
        model.serving(second).expect("layout"),
    );
    let (ids, _) = reference(&tiny(peft));
    let row = ids_row(&ids, 0);
    let adapters = [Some(&first_s), None, Some(&second_s), Some(&first_s)];
    // Each sequence already holds a different number of tokens before the shared step.
    let prefixes = [2, 5, 1, 4];

    let mut caches: Vec<KvCache> = adapters
        .iter()
        .zip(prefixes)
        .map(|(adapter, len)| {
            // A prompt-learning adapter's sequences start from its virtual tokens.
            let mut cache = adapter
                .and_then(|a| a.virtual_prefix().cloned())
                .unwrap_or_else(|| KvCache::new(model.num_layers()));
            let mut segment = [Segment {
                tokens: &row[..len],
                cache: &mut cache,
                adapter: *adapter,
            }];
            model.forward_packed(&mut segment).expect("prefill");
            cache
        })
        .collect();
    let alone: Vec<Tensor> = adapters
        .iter()
        .zip(prefixes)
        .zip(caches.clone())
        .map(|((adapter, len), mut cache)| {
            let mut segment = [Segment {
                tokens: &row[len..len + 2],
                cache: &mut cache,
                adapter: *adapter,
            }];
            model.forward_packed(&mut segment).expect("alone")
        })
        .collect();

    let mut segments: Vec<Segment<'_>> = caches
        .iter_mut()
        .zip(adapters)
        .zip(prefixes)
        .map(|((cache, adapter), len)| Segment {
            tokens: &row[len..len + 2],
            cache,
            adapter,
        })
        .collect();
    let batched = model.forward_packed(&mut segments).expect("mixed batch");
    for (i, alone) in alone.iter().enumerate() {
        let diff = max_abs_diff(
            &batched.i(i).expect("row").unsqueeze(0).expect("2-D"),
            alone,
        );
        // f32 rounding of sums taken in another order, relative to the logits' size (Gemma's
        // reach ±5, its hidden states tens).
        let scale = alone
            .abs()
            .and_then(|a| a.max_all()?.to_scalar::<f32>())
            .expect("max")
            .max(1.0);
        assert!(
            diff < 1e-5 * scale,
            "{name}: sequence {i} differs by {diff} in the batch"
        );
    }
    let between = max_abs_diff(&alone[0], &alone[2].clone());
    assert!(
        between > 1e-3,
        "{name}: the two adapters give different logits"
    );
}

/// A prompt's every row (`echo` with `logprobs`), in chunks and beside a sequence that wants
/// its last row only, gives PEFT's logits at each position; the other row is unchanged.
#[test]
fn every_row_of_a_prompt_gives_pefts_logits_in_a_mixed_batch() {
    for (name, peft) in WITH_PEFT {
        let adapter = peft_adapter(peft);
        let model = model(name, Precision::Dense);
        let serving = model.serving_adapter(&adapter).expect("layout");
        let (ids, expected) = reference(&tiny(peft));
        let row = ids_row(&ids, 0);
        let expected = expected.i(0).expect("row");
        let (mut prompt, mut other) = (
            KvCache::new(model.num_layers()),
            KvCache::new(model.num_layers()),
        );
        let split = row.len() / 2;
        let mut rows = Vec::new();
        let mut others = Vec::new();
        for chunk in [&row[..split], &row[split..]] {
            let mut segments = [
                Segment {
                    tokens: &row[..3],
                    cache: &mut other,
                    adapter: None,
                },
                Segment {
                    tokens: chunk,
                    cache: &mut prompt,
                    adapter: Some(&serving),
                },
            ];
            let logits = model
                .forward_packed_rows(&mut segments, &[false, true])
                .expect("forward_packed_rows");
            assert_eq!(logits.dims()[0], 1 + chunk.len(), "{name}: rows returned");
            others.push(logits.i(0..1).expect("the other's row"));
            rows.push(logits.i(1..).expect("the prompt's rows"));
            other = KvCache::new(model.num_layers());
        }
        let ours = Tensor::cat(&rows, 0).expect("cat");
        let diff = max_abs_diff(&ours, &expected);
        assert!(
            diff < 1e-4,
            "{name}: a prompt's rows differ from PEFT's by {diff}"
        );
        let alone = stepwise(&model, None, &row[..3], 3);
        for logits in others {
            let diff = max_abs_diff(&logits, &alone);
            assert!(
                diff < 1e-4,
                "{name}: the last-row segment changed by {diff}"
            );
        }
    }
}

/// Off the CPU fast path (here: f64 weights) attention and LoRA run as tensor ops per
/// segment, the path other devices take; it must give the same logits.
#[test]
fn the_tensor_op_path_decodes_as_the_full_forward() {
    use candle_core::DType;
    use graft_engine::models::{Config, load_weights};
    for (name, peft) in [("llama", "llama-peft"), ("qwen2", "qwen2-peft-dora")] {
        let dir = tiny(name);
        let config =
            Config::from_json(&std::fs::read_to_string(dir.join("config.json")).expect("config"))
                .expect("parses");
        let vb = load_weights(&dir, DType::F64, &Device::Cpu).expect("weights");
        let mut model = Llama::load(&vb, &config, Precision::Dense).expect("f64 model");
        let adapter = peft_adapter(peft);
        let (ids, _) = reference(&tiny(peft));
        let row = ids_row(&ids, 0);
        let ours = stepwise(&model, Some(&adapter), &row, 2);
        model.apply_adapter(&adapter).expect("fits");
        let full = full_forward(&model, &row)
            .narrow(0, 1, row.len() - 1)
            .expect("positions");
        let diff = max_abs_diff(
            &ours.to_dtype(DType::F32).expect("f32"),
            &full.to_dtype(DType::F32).expect("f32"),
        );
        assert!(diff < 1e-6, "{peft}: the tensor-op path differs by {diff}");
    }
}

/// Feeds `ids` into `cache` in `chunks` (token counts), returning every fed position's logits.
fn feed(model: &Llama, cache: &mut KvCache, ids: &[u32], chunks: &[usize]) -> Tensor {
    let mut rows = Vec::new();
    let mut at = 0;
    for &len in chunks {
        let mut segment = [Segment {
            tokens: &ids[at..at + len],
            cache: &mut *cache,
            adapter: None,
        }];
        let every = [true];
        rows.push(
            model
                .forward_packed_rows(&mut segment, &every)
                .expect("forward_packed_rows"),
        );
        at += len;
    }
    Tensor::cat(&rows, 0).expect("cat")
}

/// A sequence longer than several blocks decodes as its full forward on both backends'
/// serving paths (f32: the fused CPU ops; f64: the tensor ops other devices run), whether the
/// blocks fill in one prefill or token by token; and a second sequence that starts from the
/// first one's full blocks (a prefix-cache hit) gives the same logits after them.
#[test]
fn the_paged_cache_crosses_blocks_and_shares_them() {
    use candle_core::DType;
    use graft_engine::{
        backend::BLOCK_TOKENS,
        models::{Config, load_weights},
    };
    let dir = tiny("llama");
    let config =
        Config::from_json(&std::fs::read_to_string(dir.join("config.json")).expect("config"))
            .expect("parses");
    let len = 3 * BLOCK_TOKENS + 5;
    let vocab = u32::try_from(config.vocab_size).expect("small");
    let ids: Vec<u32> = (0..len)
        .map(|i| u32::try_from(i * 7 + 3).expect("small") % vocab)
        .collect();
    for dtype in [DType::F32, DType::F64] {
        let vb = load_weights(&dir, dtype, &Device::Cpu).expect("weights");
        let model = Llama::load(&vb, &config, Precision::Dense).expect("model");
        let f32s = |t: &Tensor| t.to_dtype(DType::F32).expect("f32");
        let full = f32s(&full_forward(&model, &ids));
        let mut whole = KvCache::new(model.num_layers());
        // A prefill across two block boundaries, then single tokens across the third.
        let mut chunks = vec![2 * BLOCK_TOKENS + 3];
        chunks.extend(std::iter::repeat_n(1, len - chunks[0]));
        let ours = f32s(&feed(&model, &mut whole, &ids, &chunks));
        assert_eq!(whole.blocks().len(), 3, "{dtype:?}: three full blocks");
        let diff = max_abs_diff(&ours, &full);
        assert!(diff < 1e-4, "{dtype:?}: paged decoding differs by {diff}");
        let shared = 2;
        let mut second =
            KvCache::with_prefix(model.num_layers(), whole.blocks()[..shared].to_vec());
        let from = shared * BLOCK_TOKENS;
        let rest = f32s(&feed(&model, &mut second, &ids[from..], &[len - from]));
        let expected = full.narrow(0, from, len - from).expect("positions");
        let diff = max_abs_diff(&rest, &expected);
        assert!(
            diff < 1e-4,
            "{dtype:?}: after shared blocks, logits differ by {diff}"
        );
        assert!(
            std::sync::Arc::ptr_eq(&second.blocks()[0], &whole.blocks()[0]),
            "the blocks are shared, not copied"
        );
    }
}
