//! A model of a training step's memory on a GPU, from the model's shapes and the step's, part
//! by part as the trainer holds them: frozen weights, adapters with their gradients and AdamW
//! state, the layer inputs kept for recomputation, one layer's recomputed graph and its
//! backward's transients, the loss's chunk of logits, and the CUDA runtime. The parts follow
//! the code: the device backend's ops (`graft_engine::backend::cuda`), `backward::recomputed`
//! and `backward::head_loss`. A test checks the model against a measured CPU step.

use graft_engine::{
    adapters::Site,
    backend::cuda::SCORES_BUDGET,
    models::{Config, Precision},
    quant::{BLOCK_SIZE, NESTED_BLOCK_SIZE},
};

use crate::backward::LOSS_CHUNK_LOGITS;

/// What a step computes on.
#[derive(Clone, Debug)]
pub struct StepShape {
    pub batch: usize,
    pub seq: usize,
    pub rank: usize,
    pub sites: Vec<Site>,
    pub precision: Precision,
    /// Bytes per activation and frozen weight: 2 in bf16 on a GPU, 4 in f32.
    pub compute_bytes: usize,
    pub dropout: bool,
    /// DoRA: a magnitude per output row of each target, and the rescaling in the graph.
    pub dora: bool,
    /// The CUDA context, cuBLAS workspace and kernel modules; 0 on the CPU.
    pub runtime_bytes: u64,
}

/// The parts of a step's peak memory, in bytes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Estimate {
    pub frozen: u64,
    /// f32 master weights, the step's accumulated gradients, a micro-batch's gradients being
    /// added in, and AdamW's two moments.
    pub adapters: u64,
    /// Every layer's input, and the gradient flowing between layers.
    pub inputs: u64,
    /// One layer's graph, recomputed for its backward.
    pub layer_graph: u64,
    /// The transients of that layer's backward.
    pub backward: u64,
    /// The loss's chunk of logits and their gradients (before the layers' backward).
    pub loss: u64,
    pub runtime: u64,
}

impl Estimate {
    /// What a micro-batch adds at its peak to what exists before it (weights, adapters and
    /// optimizer state): the kept inputs, and the larger of the loss's phase and a layer's.
    pub fn step(&self) -> u64 {
        self.inputs + (self.layer_graph + self.backward).max(self.loss)
    }

    pub fn total(&self) -> u64 {
        self.frozen + self.adapters + self.step() + self.runtime
    }

    /// One line per part and the total, in GiB.
    pub fn table(&self) -> String {
        #[allow(clippy::cast_precision_loss)]
        let gib = |b: u64| b as f64 / f64::from(1u32 << 30);
        let peak_phase = if self.layer_graph + self.backward >= self.loss {
            "the layer's phase is the larger"
        } else {
            "the loss's phase is the larger"
        };
        [
            ("frozen weights", self.frozen),
            (
                "adapters: weights, gradients, AdamW moments (f32)",
                self.adapters,
            ),
            ("layer inputs kept for recomputation", self.inputs),
            ("one layer's recomputed graph", self.layer_graph),
            ("its backward's transients", self.backward),
            ("the loss's chunk of logits and gradients", self.loss),
            ("CUDA context, cuBLAS workspace, kernels", self.runtime),
        ]
        .iter()
        .map(|(name, bytes)| format!("{name:<52} {:>8.2} GiB\n", gib(*bytes)))
        .chain([format!(
            "{:<52} {:>8.2} GiB\n",
            format!("peak of a step ({peak_phase})"),
            gib(self.total())
        )])
        .collect()
    }
}

/// The Llama-3-8B architecture (`meta-llama/Meta-Llama-3-8B`'s `config.json`).
pub const LLAMA_3_8B: &str = r#"{
  "architectures": ["LlamaForCausalLM"], "model_type": "llama",
  "hidden_size": 4096, "intermediate_size": 14336, "num_hidden_layers": 32,
  "num_attention_heads": 32, "num_key_value_heads": 8, "vocab_size": 128256,
  "max_position_embeddings": 8192, "rms_norm_eps": 1e-05, "rope_theta": 500000.0,
  "tie_word_embeddings": false, "bos_token_id": 128000, "eos_token_id": 128001
}"#;

/// The model of one training step of `config` at `shape` with layer recomputation.
#[allow(clippy::similar_names)]
pub fn training_step(config: &Config, shape: &StepShape) -> Estimate {
    let e = shape.compute_bytes as u64;
    let f32 = 4u64;
    let n = (shape.batch * shape.seq) as u64;
    let (hidden, inter, vocab) = (
        config.hidden_size as u64,
        config.intermediate_size as u64,
        config.vocab_size as u64,
    );
    let (layers, heads) = (config.num_layers as u64, config.num_heads as u64);
    let (q_width, kv_width) = (
        (config.num_heads * config.head_dim) as u64,
        (config.num_kv_heads * config.head_dim) as u64,
    );
    let targeted = |site: Site| shape.sites.contains(&site);
    let site_shape = |site: Site| config.site_shape(site).unwrap_or((0, 0));

    // Frozen weights: the embeddings and LM head stay dense, the projections as loaded.
    let frozen_projection = |site: Site| -> u64 {
        let (out, input) = site_shape(site);
        let count = (out * input) as u64;
        match shape.precision {
            Precision::Dense => count * e,
            Precision::Nf4 => {
                let blocks = count.div_ceil(BLOCK_SIZE as u64);
                count.div_ceil(2) + blocks + 4 * blocks.div_ceil(NESTED_BLOCK_SIZE as u64) + 4
            }
        }
    };
    let head = if config.tie_word_embeddings {
        0
    } else {
        vocab * hidden * e
    };
    let frozen = vocab * hidden * e
        + head
        + layers
            * (config
                .sites()
                .iter()
                .map(|&s| frozen_projection(s))
                .sum::<u64>()
                + 2 * hidden * e)
        + hidden * e;

    // Adapters: f32 master weights, the step's accumulated gradients, a micro-batch's
    // gradients being added in, and AdamW's two moments.
    let adapter_params: u64 = layers
        * shape
            .sites
            .iter()
            .map(|&s| {
                let (out, input) = site_shape(s);
                (shape.rank * (out + input) + usize::from(shape.dora) * out) as u64
            })
            .sum::<u64>();
    let adapters = 5 * adapter_params * f32;

    // Every layer's input, and the gradient flowing between layers (two while a layer's
    // backward hands on the next).
    let inputs = (layers + 1) * n * hidden * e + 2 * n * hidden * e;

    // One layer's graph, recomputed for its backward: every intermediate the forward made
    // stays referenced by the graph until the layer's backward is done.
    let norm = 3 * n * hidden * f32 + 2 * n * hidden * e;
    let projection = |site: Site| -> u64 {
        let (out, input) = site_shape(site);
        let (out, input) = (out as u64, input as u64);
        if !targeted(site) {
            return n * out * e;
        }
        adapted_graph(shape, n, (out, input))
    };
    let attention = n * q_width * e // the op's output
        + n * (q_width + 2 * kv_width) * e // its rotated query, key and value heads
        + n * heads * f32; // each query's log-sum-exp
    let graph = n * hidden * e // the layer's input as a Var
        + 2 * norm
        + config.sites().iter().map(|&s| projection(s)).sum::<u64>()
        + attention
        + 2 * n * hidden * e // the residual sums
        + 2 * n * inter * e; // silu(gate), silu(gate)·up

    // The backward's transients. candle gives each input of a node a zeroed gradient and adds
    // into it, so around the MLP the gradients of its widest tensors are held twice over (about
    // six `[rows, intermediate]` buffers at once), beside the dequantized weight of the product
    // being differentiated. In attention (`backend::cuda::attention`): a block's probabilities,
    // dP and dS, one more while each replaces the last, the probabilities cast for their
    // product, the output and its gradient by head, and dQ, dK, dV block by block and
    // concatenated.
    let (widest_out, widest_in) = config
        .sites()
        .iter()
        .map(|&s| site_shape(s))
        .max_by_key(|(o, i)| o * i)
        .unwrap_or((0, 0));
    let dequantized = (widest_out * widest_in) as u64 * e;
    let mlp_phase = 6 * n * inter * e + 2 * dequantized;
    let seq = shape.seq as u64;
    let block_scores = (shape.batch as u64 * heads * seq * seq * f32).min(SCORES_BUDGET as u64);
    let attention_phase = 4 * block_scores
        + block_scores / f32 * e
        + 2 * n * q_width * e
        + n * heads * f32
        + 2 * n * (q_width + 2 * kv_width) * e
        + dequantized;
    let backward = mlp_phase.max(attention_phase);

    // The loss, a chunk of positions at a time (`loss::nll_sum` under `backward::head_loss`):
    // the chunk's logits in the compute dtype; in f32 a contiguous copy, the shifted logits,
    // their exponentials and the log-softmax, all kept by the graph; then the gradients of
    // each, a zeroed buffer and a sum apiece.
    // Before them, the head's RMSNorm over the chunk's hidden states, composed in f32.
    let chunk_logits = (LOSS_CHUNK_LOGITS as u64).min(n * vocab);
    let chunk_rows = chunk_logits / vocab.max(1);
    let loss = chunk_logits * (e + 11 * f32) + chunk_rows * hidden * (3 * e + 3 * f32);

    Estimate {
        frozen,
        adapters,
        inputs,
        layer_graph: graph,
        backward,
        loss,
        runtime: shape.runtime_bytes,
    }
}

/// The graph of one adapted projection of `rows` rows: its output and the op's kept tensors,
/// the masked input with dropout, `x·Aᵀ`. DoRA (`graft_engine::models::dora`) adds the
/// rescaled output; with dropout also the mask and the dropped input, a second adapted
/// projection of it (which holds as many input-sized tensors as the first), its product with
/// `r − 1`, the sum, and the rescaled output. Measured on the CPU within 4% (tests/memory.rs).
fn adapted_graph(shape: &StepShape, rows: u64, (out, input): (u64, u64)) -> u64 {
    let e = shape.compute_bytes as u64;
    let masked = if shape.dropout {
        2 * rows * input * e
    } else {
        0
    };
    let adapted = 4 * rows * out * e + masked + rows * shape.rank as u64 * e;
    adapted
        + match (shape.dora, shape.dropout) {
            (false, _) => 0,
            (true, false) => rows * out * e,
            (true, true) => 2 * rows * input * e + adapted + 3 * rows * out * e,
        }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn qlora_8b(batch: usize, seq: usize) -> Estimate {
        let config = Config::from_json(LLAMA_3_8B).expect("the 8B config parses");
        training_step(
            &config,
            &StepShape {
                batch,
                seq,
                rank: 16,
                sites: config.sites().to_vec(),
                precision: Precision::Nf4,
                compute_bytes: 2,
                dropout: true,
                dora: false,
                runtime_bytes: 1 << 30,
            },
        )
    }

    #[test]
    fn qlora_of_llama_3_8b_at_8192_tokens_fits_a_24_gb_gpu() {
        let long = qlora_8b(1, 8192);
        assert!(
            long.total() < 24_000_000_000,
            "seq 8192 batch 1:\n{}",
            long.table()
        );
        let frozen = long.frozen;
        // 6.98 billion projection weights at ≈ 4.13 bits, plus two dense 128256 × 4096
        // matrices in bf16.
        assert!((5_600_000_000..5_800_000_000).contains(&frozen), "{frozen}");
        // Four sequences of 2048 hold as many activations as one of 8192, but less attention.
        let wide = qlora_8b(4, 2048);
        assert!(
            wide.total() <= long.total(),
            "{}\n{}",
            wide.table(),
            long.table()
        );
    }
}
