//! How many tokens' keys and values the server keeps for all its sequences together: what
//! `--kv-cache-tokens` says, or a share of the memory left once the weights are loaded and room
//! is kept for the adapter cache. Admission and preemption work within it, so a burst of long
//! requests queues or waits instead of running the process out of memory.

use crate::model::BaseModel;

/// Bytes one token's keys and values take over every layer, in the dtype the backend keeps.
pub fn bytes_per_token(model: &BaseModel) -> usize {
    let config = model.llama.config();
    config.num_layers
        * 2
        * config.num_kv_heads
        * config.head_dim
        * model.llama.dtype().size_in_bytes()
}

/// Bytes one adapter of rank `max_lora_rank` on every projection takes: an adapter's share of
/// the adapter cache. A prompt-learning adapter's virtual tokens' keys and values are held in
/// such a share too.
pub fn adapter_slot_bytes(model: &BaseModel) -> usize {
    let llama = &model.llama;
    let per_layer: usize = llama
        .sites()
        .iter()
        .filter_map(|&site| llama.site_shape(site))
        .map(|(out, input)| (out + input) * model.info.max_lora_rank)
        .sum();
    per_layer * llama.num_layers() * model.lora_dtype.size_in_bytes()
}

/// Bytes `max_loaded_adapters` adapter shares take: the adapter cache at its fullest.
pub fn adapter_cache_bytes(model: &BaseModel) -> usize {
    adapter_slot_bytes(model) * model.info.max_loaded_adapters
}

/// The budget in tokens: `requested`, or `fraction` of the free memory less the adapter
/// cache, at most what `max_batch` sequences of the whole context could use; never less than
/// one whole context, which every admitted sequence must be able to reach.
pub fn kv_cache_tokens(
    model: &BaseModel,
    requested: Option<usize>,
    fraction: f64,
    max_batch: usize,
) -> Result<usize, String> {
    use graft_engine::backend::BLOCK_TOKENS;
    let per_token = bytes_per_token(model).max(1);
    let context = model.max_model_len;
    // The longest sequence's blocks, and one for the token after an admitted context.
    let least = (context.div_ceil(BLOCK_TOKENS) + 1) * BLOCK_TOKENS;
    let tokens = if let Some(tokens) = requested {
        tokens
    } else {
        let free = graft_engine::device::free_memory(model.llama.device()).ok_or_else(|| {
            "the free memory of the device cannot be read: set --kv-cache-tokens".to_owned()
        })?;
        #[allow(
            clippy::cast_precision_loss,
            clippy::cast_possible_truncation,
            clippy::cast_sign_loss
        )]
        let share = (free as f64 * fraction) as usize;
        let budget = share.saturating_sub(adapter_cache_bytes(model)) / per_token;
        budget.min((max_batch.max(1) * context).max(least))
    };
    if tokens < least {
        return Err(format!(
            "the KV cache holds {tokens} tokens ({} MiB), less than the {least} one sequence of \
             --max-model-len {context} needs: lower --max-model-len or give it more memory \
             (--kv-cache-tokens, --kv-cache-memory-fraction)",
            (tokens * per_token) >> 20
        ));
    }
    Ok(tokens)
}
