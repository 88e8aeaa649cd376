//! One sequence's keys and values, layer by layer, for serving. Each backend keeps its own
//! form: the CPU backend rows of f32 appended in place, the other one tensors on the device.

use candle_core::Tensor;

/// One sequence's keys and values.
#[derive(Clone, Debug)]
pub struct KvCache {
    pub(crate) layers: Vec<LayerCache>,
    len: usize,
}

#[derive(Clone, Debug, Default)]
pub(crate) struct LayerCache {
    /// CPU backend: `[tokens, kv_heads, head_dim]` f32, rotated keys and values.
    pub k: Vec<f32>,
    pub v: Vec<f32>,
    /// Device backend: `[kv_heads, tokens, head_dim]` tensors in the compute dtype.
    pub tensors: Option<(Tensor, Tensor)>,
}

impl KvCache {
    /// An empty cache for a model of `layers` decoder layers.
    pub fn new(layers: usize) -> Self {
        Self {
            layers: vec![LayerCache::default(); layers],
            len: 0,
        }
    }

    /// Tokens cached so far: the position of the next token.
    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Counts `tokens` more once every layer holds them.
    pub(crate) fn advance(&mut self, tokens: usize) {
        self.len += tokens;
    }
}
