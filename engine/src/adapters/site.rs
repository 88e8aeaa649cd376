//! Which projection of a decoder layer: the vocabulary shared by the model, the adapters and
//! the backends, so that each of them imports it from below.

/// The projections an adapter can target, by their Hugging Face names.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Site {
    QProj,
    KProj,
    VProj,
    OProj,
    GateProj,
    UpProj,
    DownProj,
    /// Phi-3's fused `q_proj`, `k_proj` and `v_proj`, in that order of output rows.
    QkvProj,
    /// Phi-3's fused `gate_proj` and `up_proj`, in that order of output rows.
    GateUpProj,
}

impl Site {
    /// How many sites there are, any architecture's: `site as usize` is below it.
    pub const COUNT: usize = Self::GateUpProj as usize + 1;

    /// A decoder layer's projections where each is its own linear (Llama, Qwen, Gemma).
    pub const SEPARATE: [Self; 7] = [
        Self::QProj,
        Self::KProj,
        Self::VProj,
        Self::OProj,
        Self::GateProj,
        Self::UpProj,
        Self::DownProj,
    ];

    /// A decoder layer's projections where q/k/v and gate/up are fused (Phi-3).
    pub const FUSED: [Self; 4] = [Self::QkvProj, Self::OProj, Self::GateUpProj, Self::DownProj];

    /// `q_proj` … `down_proj`, `qkv_proj`, `gate_up_proj`.
    pub fn name(self) -> &'static str {
        match self {
            Self::QProj => "q_proj",
            Self::KProj => "k_proj",
            Self::VProj => "v_proj",
            Self::OProj => "o_proj",
            Self::GateProj => "gate_proj",
            Self::UpProj => "up_proj",
            Self::DownProj => "down_proj",
            Self::QkvProj => "qkv_proj",
            Self::GateUpProj => "gate_up_proj",
        }
    }

    /// The module path inside a decoder layer: `self_attn.q_proj`, `mlp.gate_proj`.
    pub fn path(self) -> String {
        let parent = match self {
            Self::QProj | Self::KProj | Self::VProj | Self::OProj | Self::QkvProj => "self_attn",
            Self::GateProj | Self::UpProj | Self::DownProj | Self::GateUpProj => "mlp",
        };
        format!("{parent}.{}", self.name())
    }

    /// The module's full name in a Hugging Face model, `model.layers.{layer}.{path}`: what
    /// PEFT's patterns match and its tensor names extend.
    pub fn module(self, layer: usize) -> String {
        format!("model.layers.{layer}.{}", self.path())
    }

    /// `q_proj, k_proj, …`: for messages.
    pub fn names(sites: &[Self]) -> String {
        sites
            .iter()
            .map(|s| s.name())
            .collect::<Vec<_>>()
            .join(", ")
    }

    pub fn from_name(name: &str) -> Option<Self> {
        Self::SEPARATE
            .into_iter()
            .chain(Self::FUSED)
            .find(|s| s.name() == name)
    }
}
