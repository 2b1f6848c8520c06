//! Where an adapter attaches: a linear layer of a Llama-family decoder, named as PEFT names it.

use std::collections::BTreeMap;
use std::fmt;

/// A linear projection of a decoder layer, with PEFT/HF module names.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Module {
    /// `self_attn.q_proj`
    QProj,
    /// `self_attn.k_proj`
    KProj,
    /// `self_attn.v_proj`
    VProj,
    /// `self_attn.o_proj`
    OProj,
    /// `self_attn.qkv_proj` (fused, e.g. Phi-3)
    QkvProj,
    /// `mlp.gate_proj`
    GateProj,
    /// `mlp.up_proj`
    UpProj,
    /// `mlp.down_proj`
    DownProj,
    /// `mlp.gate_up_proj` (fused, e.g. Phi-3)
    GateUpProj,
}

impl Module {
    /// All modules, in a fixed order.
    pub const ALL: [Module; 9] = [
        Module::QProj,
        Module::KProj,
        Module::VProj,
        Module::OProj,
        Module::QkvProj,
        Module::GateProj,
        Module::UpProj,
        Module::DownProj,
        Module::GateUpProj,
    ];

    /// The leaf module name (`q_proj`, ...).
    pub fn name(self) -> &'static str {
        match self {
            Module::QProj => "q_proj",
            Module::KProj => "k_proj",
            Module::VProj => "v_proj",
            Module::OProj => "o_proj",
            Module::QkvProj => "qkv_proj",
            Module::GateProj => "gate_proj",
            Module::UpProj => "up_proj",
            Module::DownProj => "down_proj",
            Module::GateUpProj => "gate_up_proj",
        }
    }

    /// The parent module (`self_attn` or `mlp`).
    pub fn parent(self) -> &'static str {
        match self {
            Module::QProj | Module::KProj | Module::VProj | Module::OProj | Module::QkvProj => {
                "self_attn"
            }
            Module::GateProj | Module::UpProj | Module::DownProj | Module::GateUpProj => "mlp",
        }
    }

    /// Parses a leaf name (`q_proj`) or a parent-qualified name (`self_attn.q_proj`).
    pub fn from_name(name: &str) -> Option<Module> {
        Module::ALL
            .into_iter()
            .find(|m| name == m.name() || name == format!("{}.{}", m.parent(), m.name()))
    }
}

impl fmt::Display for Module {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}.{}", self.parent(), self.name())
    }
}

/// One adaptable linear layer: a module in a decoder layer.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Site {
    /// Decoder layer index (0-based).
    pub layer: usize,
    /// Which projection.
    pub module: Module,
}

impl Site {
    /// A site.
    pub fn new(layer: usize, module: Module) -> Self {
        Site { layer, module }
    }

    /// The HF module path, e.g. `model.layers.3.self_attn.q_proj`.
    pub fn module_path(&self) -> String {
        format!("model.layers.{}.{}", self.layer, self.module)
    }

    /// The PEFT tensor-key prefix, e.g. `base_model.model.model.layers.3.self_attn.q_proj`.
    pub fn peft_prefix(&self) -> String {
        format!("base_model.model.{}", self.module_path())
    }

    /// Parses a PEFT key such as `base_model.model.model.layers.3.self_attn.q_proj.lora_A.weight`
    /// (also with an adapter name: `...lora_A.default.weight`) into its site and factor.
    pub fn parse_peft_key(key: &str) -> Option<(Site, Factor)> {
        let rest = key.strip_prefix("base_model.model.model.layers.")?;
        let (layer, rest) = rest.split_once('.')?;
        let layer: usize = layer.parse().ok()?;
        let (parent, rest) = rest.split_once('.')?;
        let (leaf, rest) = rest.split_once('.')?;
        let module = Module::from_name(leaf).filter(|m| m.parent() == parent)?;
        let (factor, rest) = rest.split_once('.')?;
        let factor = match factor {
            "lora_A" => Factor::A,
            "lora_B" => Factor::B,
            _ => return None,
        };
        // `weight` or `<adapter name>.weight`
        if rest != "weight" && !rest.ends_with(".weight") {
            return None;
        }
        Some((Site { layer, module }, factor))
    }

    /// The PEFT tensor key of a factor at this site (no adapter name inside, as PEFT saves).
    pub fn peft_key(&self, factor: Factor) -> String {
        let f = match factor {
            Factor::A => "lora_A",
            Factor::B => "lora_B",
        };
        format!("{}.{}.weight", self.peft_prefix(), f)
    }
}

impl fmt::Display for Site {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.module_path())
    }
}

/// Which LoRA factor: `A` (`[r, in]`, down-projection) or `B` (`[out, r]`, up-projection).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Factor {
    /// `lora_A`, shape `[r, in_features]`.
    A,
    /// `lora_B`, shape `[out_features, r]`.
    B,
}

/// Input and output width of a base linear layer (`weight` is `[out_features, in_features]`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct LinearShape {
    /// `in_features`.
    pub in_features: usize,
    /// `out_features`.
    pub out_features: usize,
}

/// The adaptable linear layers of a base model and their shapes, as the model reports them.
pub type BaseShapes = BTreeMap<Site, LinearShape>;

/// Base shapes of a standard Llama-family decoder with separate q/k/v and gate/up projections.
pub fn llama_base_shapes(
    num_layers: usize,
    hidden: usize,
    num_heads: usize,
    num_kv_heads: usize,
    head_dim: usize,
    intermediate: usize,
) -> BaseShapes {
    let mut shapes = BaseShapes::new();
    let sh = |i, o| LinearShape {
        in_features: i,
        out_features: o,
    };
    for layer in 0..num_layers {
        let mut put = |m, s| {
            shapes.insert(Site::new(layer, m), s);
        };
        put(Module::QProj, sh(hidden, num_heads * head_dim));
        put(Module::KProj, sh(hidden, num_kv_heads * head_dim));
        put(Module::VProj, sh(hidden, num_kv_heads * head_dim));
        put(Module::OProj, sh(num_heads * head_dim, hidden));
        put(Module::GateProj, sh(hidden, intermediate));
        put(Module::UpProj, sh(hidden, intermediate));
        put(Module::DownProj, sh(intermediate, hidden));
    }
    shapes
}
