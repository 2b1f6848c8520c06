//! The adapter bank: named LoRA adapters over one frozen base, and the batched LoRA delta.

use std::collections::BTreeMap;

use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use tch::{Device, Kind, Tensor};

use crate::config::LoraConfig;
use crate::error::{LoraError, Result};
use crate::site::{BaseShapes, Factor, LinearShape, Site};

/// Stable handle of an adapter in a bank; never reused after [`AdapterBank::remove`].
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct AdapterId(pub(crate) u32);

impl AdapterId {
    /// The raw number (for logs and cache keys).
    pub fn raw(self) -> u32 {
        self.0
    }
}

/// Which adapter each row of a batch uses.
#[derive(Clone, Debug, PartialEq, Eq, Default)]
pub enum AdapterSelection {
    /// Base model only.
    #[default]
    None,
    /// Every row uses this adapter.
    All(AdapterId),
    /// Row `i` uses `rows[i]` (`None`: base only). Length must equal the batch size.
    PerRow(Vec<Option<AdapterId>>),
}

impl AdapterSelection {
    /// Whether every row gets the same delta (no adapter, or one for all rows), so the delta
    /// of a row does not depend on where it sits in the batch.
    pub fn is_uniform(&self) -> bool {
        !matches!(self, Self::PerRow(_))
    }
}

/// How [`AdapterBank::delta`] computes a per-row (mixed-adapter) batch. Both give the same
/// result; see `docs/lora.md` for which is faster where.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum DeltaStrategy {
    /// `Gathered` when rows have at least [`AUTO_GATHER_MIN_POSITIONS`] positions (prefill),
    /// `Grouped` otherwise (decode), following the CPU measurements in `docs/lora.md`.
    #[default]
    Auto,
    /// Group rows by adapter: index_select the rows, two matmuls, index_add back.
    Grouped,
    /// Gather per-row factors (ranks zero-padded to the largest, scale folded into B) and run
    /// two batched matmuls over the whole batch.
    Gathered,
}

/// Positions per row from which [`DeltaStrategy::Auto`] gathers instead of grouping.
pub const AUTO_GATHER_MIN_POSITIONS: i64 = 16;

/// The two LoRA factors at one site: `A` is `[r, in]`, `B` is `[out, r]`.
#[derive(Debug)]
pub struct LoraWeights {
    /// Down-projection `lora_A.weight`, `[r, in_features]`.
    pub a: Tensor,
    /// Up-projection `lora_B.weight`, `[out_features, r]`.
    pub b: Tensor,
}

impl LoraWeights {
    /// The factor `A` or `B`.
    pub fn factor(&self, f: Factor) -> &Tensor {
        match f {
            Factor::A => &self.a,
            Factor::B => &self.b,
        }
    }

    fn deep_clone(&self) -> Result<LoraWeights> {
        let copy = |t: &Tensor| -> Result<Tensor> {
            let mut fresh = Tensor::f_empty_like(t)?;
            tch::no_grad(|| fresh.f_copy_(t))?;
            Ok(fresh)
        };
        Ok(LoraWeights {
            a: copy(&self.a)?,
            b: copy(&self.b)?,
        })
    }
}

/// One named adapter: its config, per-site weights and version.
#[derive(Debug)]
pub struct Adapter {
    name: String,
    id: AdapterId,
    config: LoraConfig,
    seed: u64,
    weights: BTreeMap<Site, LoraWeights>,
    version: u64,
}

impl Adapter {
    /// The adapter's name in the bank.
    pub fn name(&self) -> &str {
        &self.name
    }
    /// The adapter's id.
    pub fn id(&self) -> AdapterId {
        self.id
    }
    /// Its LoRA config.
    pub fn config(&self) -> &LoraConfig {
        &self.config
    }
    /// The seed used for (re)initialisation.
    pub fn seed(&self) -> u64 {
        self.seed
    }
    /// Multiplier of `B·A` (from the config).
    pub fn scale(&self) -> f64 {
        self.config.scale()
    }
    /// Version number; changes on every modification made through the bank.
    pub fn version(&self) -> u64 {
        self.version
    }
    /// Sites this adapter has weights for, in order.
    pub fn sites(&self) -> impl Iterator<Item = &Site> {
        self.weights.keys()
    }
    /// Weights at a site, if the adapter targets it.
    pub fn weights(&self, site: &Site) -> Option<&LoraWeights> {
        self.weights.get(site)
    }
    /// Mutable weights at a site (use through [`AdapterBank::modify`], which bumps the version).
    pub fn weights_mut(&mut self, site: &Site) -> Option<&mut LoraWeights> {
        self.weights.get_mut(site)
    }
    /// All `(PEFT key, tensor)` pairs, in key order. Tensors share storage with the adapter.
    pub fn named_tensors(&self) -> Vec<(String, Tensor)> {
        let mut out = Vec::with_capacity(2 * self.weights.len());
        for (site, w) in &self.weights {
            out.push((site.peft_key(Factor::A), w.a.shallow_clone()));
            out.push((site.peft_key(Factor::B), w.b.shallow_clone()));
        }
        out
    }
    /// All tensors (A and B of every site), sharing storage: hand these to an optimizer.
    pub fn parameters(&self) -> Vec<Tensor> {
        self.named_tensors().into_iter().map(|(_, t)| t).collect()
    }
}

/// Named LoRA adapters over one frozen base model.
///
/// Adapter weights are stored in the bank's kind (f32 by default) on its device. [`delta`]
/// casts the input to that kind, computes the LoRA contribution and casts the result back to
/// the input's kind, so a bf16 base can carry f32 adapters.
///
/// [`delta`]: AdapterBank::delta
#[derive(Debug)]
pub struct AdapterBank {
    base: BaseShapes,
    device: Device,
    kind: Kind,
    adapters: BTreeMap<AdapterId, Adapter>,
    by_name: BTreeMap<String, AdapterId>,
    next_id: u32,
    next_version: u64,
    trainable: Option<AdapterId>,
    strategy: DeltaStrategy,
    training: bool,
}

/// Fills `[rows, cols]` with PEFT's default A init: Kaiming-uniform with a=√5, i.e.
/// U(-1/√cols, 1/√cols), drawn from a ChaCha8 stream (deterministic across devices).
fn kaiming_uniform(rng: &mut ChaCha8Rng, rows: usize, cols: usize) -> Vec<f32> {
    let bound = 1.0 / (cols as f64).sqrt();
    (0..rows * cols)
        .map(|_| rng.random_range(-bound..bound) as f32)
        .collect()
}

impl AdapterBank {
    /// An empty bank over a base with these adaptable linear layers; adapters are kept in f32.
    pub fn new(base: BaseShapes, device: Device) -> Self {
        Self::with_kind(base, device, Kind::Float)
    }

    /// An empty bank storing adapter weights in `kind` (f32, f16 or bf16).
    pub fn with_kind(base: BaseShapes, device: Device, kind: Kind) -> Self {
        AdapterBank {
            base,
            device,
            kind,
            adapters: BTreeMap::new(),
            by_name: BTreeMap::new(),
            next_id: 0,
            next_version: 1,
            trainable: None,
            strategy: DeltaStrategy::default(),
            training: false,
        }
    }

    /// Training mode (PEFT's `train()`): each adapter's deltas drop their input with its
    /// `lora_dropout` probability (inverted dropout from libtorch's global generator, as
    /// `torch.nn.Dropout`). Off by default and for inference (PEFT's `eval()`).
    pub fn set_training(&mut self, on: bool) {
        self.training = on;
    }

    /// Whether the bank is in training mode ([`Self::set_training`]).
    pub fn is_training(&self) -> bool {
        self.training
    }

    /// The dropout probability `adapter`'s deltas apply now: its `lora_dropout` in training
    /// mode, else 0.
    fn dropout_of(&self, adapter: &Adapter) -> f64 {
        if self.training {
            adapter.config.lora_dropout
        } else {
            0.0
        }
    }

    /// The base model's adaptable layers.
    pub fn base_shapes(&self) -> &BaseShapes {
        &self.base
    }
    /// Device of the adapter weights.
    pub fn device(&self) -> Device {
        self.device
    }
    /// Kind of the adapter weights.
    pub fn kind(&self) -> Kind {
        self.kind
    }
    /// How per-row batches are computed.
    pub fn delta_strategy(&self) -> DeltaStrategy {
        self.strategy
    }
    /// Chooses how per-row batches are computed.
    pub fn set_delta_strategy(&mut self, strategy: DeltaStrategy) {
        self.strategy = strategy;
    }
    /// Number of adapters.
    pub fn len(&self) -> usize {
        self.adapters.len()
    }
    /// Whether the bank holds no adapter.
    pub fn is_empty(&self) -> bool {
        self.adapters.is_empty()
    }

    fn bump(&mut self) -> u64 {
        let v = self.next_version;
        self.next_version += 1;
        v
    }

    fn shape_of(&self, site: &Site) -> Result<LinearShape> {
        self.base
            .get(site)
            .copied()
            .ok_or_else(|| LoraError::BaseWeight {
                site: site.to_string(),
                reason: "site not in the bank's base shapes".into(),
            })
    }

    fn init_weights(
        &self,
        name: &str,
        config: &LoraConfig,
        seed: u64,
    ) -> Result<BTreeMap<Site, LoraWeights>> {
        config.validate()?;
        let sites = config.target_sites(&self.base);
        if sites.is_empty() {
            return Err(LoraError::NoTargetSites { name: name.into() });
        }
        let mut rng = ChaCha8Rng::seed_from_u64(seed);
        let r = config.r;
        let mut weights = BTreeMap::new();
        for site in sites {
            let shape = self.shape_of(&site)?;
            let a = kaiming_uniform(&mut rng, r, shape.in_features);
            let a = Tensor::f_from_slice(&a)?
                .f_reshape([r as i64, shape.in_features as i64])?
                .f_to_dtype(self.kind, false, false)?
                .f_to_device(self.device)?;
            let b = Tensor::f_zeros(
                [shape.out_features as i64, r as i64],
                (self.kind, self.device),
            )?;
            weights.insert(site, LoraWeights { a, b });
        }
        Ok(weights)
    }

    fn insert(
        &mut self,
        name: &str,
        config: LoraConfig,
        seed: u64,
        weights: BTreeMap<Site, LoraWeights>,
    ) -> AdapterId {
        let id = AdapterId(self.next_id);
        self.next_id += 1;
        let version = self.bump();
        self.adapters.insert(
            id,
            Adapter {
                name: name.to_string(),
                id,
                config,
                seed,
                weights,
                version,
            },
        );
        self.by_name.insert(name.to_string(), id);
        id
    }

    /// Adds a fresh adapter: A Kaiming-uniform(a=√5) from `seed`, B zero (PEFT's default init),
    /// on every base site the config targets. Not trainable until [`set_trainable`].
    ///
    /// [`set_trainable`]: AdapterBank::set_trainable
    pub fn add(&mut self, name: &str, config: &LoraConfig, seed: u64) -> Result<AdapterId> {
        let _span = tracing::debug_span!("lora_add", adapter = name).entered();
        if self.by_name.contains_key(name) {
            return Err(LoraError::AdapterExists { name: name.into() });
        }
        let weights = self.init_weights(name, config, seed)?;
        Ok(self.insert(name, config.clone(), seed, weights))
    }

    /// Adds an adapter with given weights (checked against the base and config).
    pub(crate) fn add_with_weights(
        &mut self,
        name: &str,
        config: LoraConfig,
        weights: BTreeMap<Site, LoraWeights>,
    ) -> Result<AdapterId> {
        if self.by_name.contains_key(name) {
            return Err(LoraError::AdapterExists { name: name.into() });
        }
        Ok(self.insert(name, config, 0, weights))
    }

    /// The id of a named adapter.
    pub fn id(&self, name: &str) -> Result<AdapterId> {
        self.by_name
            .get(name)
            .copied()
            .ok_or_else(|| LoraError::UnknownAdapter { name: name.into() })
    }

    /// A named adapter.
    pub fn get(&self, name: &str) -> Result<&Adapter> {
        let id = self.id(name)?;
        self.get_by_id(id)
    }

    /// An adapter by id.
    pub fn get_by_id(&self, id: AdapterId) -> Result<&Adapter> {
        self.adapters
            .get(&id)
            .ok_or(LoraError::UnknownAdapterId { id: id.0 })
    }

    fn get_mut(&mut self, name: &str) -> Result<&mut Adapter> {
        let id = self.id(name)?;
        self.adapters
            .get_mut(&id)
            .ok_or(LoraError::UnknownAdapterId { id: id.0 })
    }

    /// Adapter names, sorted.
    pub fn names(&self) -> Vec<&str> {
        self.by_name.keys().map(String::as_str).collect()
    }

    /// Removes an adapter and returns it. Its id is never reused.
    pub fn remove(&mut self, name: &str) -> Result<Adapter> {
        let id = self.id(name)?;
        self.by_name.remove(name);
        if self.trainable == Some(id) {
            self.trainable = None;
        }
        self.adapters
            .remove(&id)
            .ok_or(LoraError::UnknownAdapterId { id: id.0 })
    }

    /// The version of an adapter: bumped by every change made through the bank (add, load, copy
    /// into, lerp, reset, [`modify`], [`mark_updated`]); versions are unique across the bank, so
    /// `(id, version)` is a sound KV-cache key.
    ///
    /// [`modify`]: AdapterBank::modify
    /// [`mark_updated`]: AdapterBank::mark_updated
    pub fn version(&self, name: &str) -> Result<u64> {
        Ok(self.get(name)?.version)
    }

    /// Records that an adapter's tensors were changed outside the bank (e.g. an optimizer step on
    /// its [`Adapter::parameters`]); returns the new version.
    pub fn mark_updated(&mut self, name: &str) -> Result<u64> {
        let v = self.bump();
        self.get_mut(name)?.version = v;
        Ok(v)
    }

    /// Runs `f` on an adapter's weights without gradient tracking, then bumps its version.
    pub fn modify<R>(&mut self, name: &str, f: impl FnOnce(&mut Adapter) -> R) -> Result<R> {
        let adapter = self.get_mut(name)?;
        let r = tch::no_grad(|| f(adapter));
        self.mark_updated(name)?;
        Ok(r)
    }

    /// Makes `name` the only adapter whose tensors require grad (all others, and the base,
    /// stay frozen).
    pub fn set_trainable(&mut self, name: &str) -> Result<()> {
        let id = self.id(name)?;
        for (aid, adapter) in self.adapters.iter_mut() {
            let on = *aid == id;
            for w in adapter.weights.values_mut() {
                let _ = w.a.f_requires_grad_(on)?;
                let _ = w.b.f_requires_grad_(on)?;
            }
        }
        self.trainable = Some(id);
        Ok(())
    }

    /// Turns gradient tracking off on every adapter.
    pub fn freeze_all(&mut self) -> Result<()> {
        for adapter in self.adapters.values_mut() {
            for w in adapter.weights.values_mut() {
                let _ = w.a.f_requires_grad_(false)?;
                let _ = w.b.f_requires_grad_(false)?;
            }
        }
        self.trainable = None;
        Ok(())
    }

    /// The adapter currently requiring grad, if any.
    pub fn trainable(&self) -> Option<&str> {
        self.trainable
            .and_then(|id| self.adapters.get(&id))
            .map(|a| a.name.as_str())
    }

    fn check_compatible(&self, left: &Adapter, right: &Adapter) -> Result<()> {
        let err = |reason: String| LoraError::Incompatible {
            left: left.name.clone(),
            right: right.name.clone(),
            reason,
        };
        if left.config.r != right.config.r {
            return Err(err(format!("rank {} vs {}", left.config.r, right.config.r)));
        }
        if !left.weights.keys().eq(right.weights.keys()) {
            return Err(err("they adapt different sites".into()));
        }
        Ok(())
    }

    /// Copies adapter `from` into `to`: when `to` exists it must have the same structure and its
    /// tensors are overwritten in place (optimizer references stay valid); otherwise `to` is
    /// created as a frozen deep copy (same config and seed).
    pub fn copy(&mut self, from: &str, to: &str) -> Result<AdapterId> {
        let _span = tracing::debug_span!("lora_copy", from, to).entered();
        let src_id = self.id(from)?;
        if from == to {
            return Ok(src_id);
        }
        match self.by_name.get(to).copied() {
            None => {
                let src = self.get_by_id(src_id)?;
                let mut weights = BTreeMap::new();
                for (site, w) in &src.weights {
                    weights.insert(*site, w.deep_clone()?);
                }
                let (config, seed) = (src.config.clone(), src.seed);
                Ok(self.insert(to, config, seed, weights))
            }
            Some(dst_id) => {
                let src = self.get_by_id(src_id)?;
                let dst = self.get_by_id(dst_id)?;
                self.check_compatible(dst, src)?;
                self.pairwise(dst_id, src_id, |d, s| d.f_copy_(s))?;
                let v = self.bump();
                let config = self.get_by_id(src_id)?.config.clone();
                if let Some(dst) = self.adapters.get_mut(&dst_id) {
                    dst.version = v;
                    dst.config = config;
                }
                Ok(dst_id)
            }
        }
    }

    /// Applies `op(dst_tensor, src_tensor)` to every pair of corresponding tensors, without grad.
    fn pairwise(
        &mut self,
        dst: AdapterId,
        src: AdapterId,
        op: impl Fn(&mut Tensor, &Tensor) -> std::result::Result<(), tch::TchError>,
    ) -> Result<()> {
        let src_tensors: Vec<(Site, Tensor, Tensor)> = self
            .get_by_id(src)?
            .weights
            .iter()
            .map(|(s, w)| (*s, w.a.shallow_clone(), w.b.shallow_clone()))
            .collect();
        let dst_adapter = self
            .adapters
            .get_mut(&dst)
            .ok_or(LoraError::UnknownAdapterId { id: dst.0 })?;
        tch::no_grad(|| -> Result<()> {
            for (site, a, b) in &src_tensors {
                if let Some(w) = dst_adapter.weights.get_mut(site) {
                    op(&mut w.a, a)?;
                    op(&mut w.b, b)?;
                }
            }
            Ok(())
        })
    }

    /// Soft reference update `reference ← reference + w·(trained − reference)`, in place.
    pub fn lerp(&mut self, reference: &str, trained: &str, w: f64) -> Result<()> {
        let _span = tracing::debug_span!("lora_lerp", reference, trained, w).entered();
        let ref_id = self.id(reference)?;
        let tr_id = self.id(trained)?;
        let (ref_a, tr_a) = (self.get_by_id(ref_id)?, self.get_by_id(tr_id)?);
        self.check_compatible(ref_a, tr_a)?;
        if ref_a.scale() != tr_a.scale() {
            return Err(LoraError::Incompatible {
                left: reference.into(),
                right: trained.into(),
                reason: format!("scale {} vs {}", ref_a.scale(), tr_a.scale()),
            });
        }
        self.pairwise(ref_id, tr_id, |d, s| {
            let _ = d.f_lerp_(s, w)?;
            Ok(())
        })?;
        let v = self.bump();
        if let Some(a) = self.adapters.get_mut(&ref_id) {
            a.version = v;
        }
        Ok(())
    }

    /// Re-initialises an adapter as freshly added from its seed (A Kaiming-uniform, B zero),
    /// in place.
    pub fn reset(&mut self, name: &str) -> Result<()> {
        let adapter = self.get(name)?;
        let fresh = self.init_weights(name, &adapter.config.clone(), adapter.seed)?;
        self.modify(name, |adapter| -> Result<()> {
            for (site, w) in adapter.weights.iter_mut() {
                if let Some(f) = fresh.get(site) {
                    w.a.f_copy_(&f.a)?;
                    w.b.f_copy_(&f.b)?;
                }
            }
            Ok(())
        })?
    }

    /// Builds a per-row selection from adapter names (`None`: base only).
    pub fn selection(&self, rows: &[Option<&str>]) -> Result<AdapterSelection> {
        let ids = rows
            .iter()
            .map(|r| r.map(|n| self.id(n)).transpose())
            .collect::<Result<Vec<_>>>()?;
        Ok(AdapterSelection::PerRow(ids))
    }

    /// The LoRA contribution `scale · (x Aᵀ) Bᵀ` at `site` for input `x` (`[B, ..., in]`), to be
    /// added to the base linear's output; `None` when no selected adapter targets the site.
    ///
    /// With [`AdapterSelection::PerRow`], rows are grouped by adapter (index_select, two matmuls,
    /// index_add), so the result equals separate passes per adapter. The computation runs in the
    /// bank's kind; the result has `x`'s kind. Gradients flow to the trainable adapter.
    pub fn delta(&self, site: &Site, x: &Tensor, sel: &AdapterSelection) -> Result<Option<Tensor>> {
        match sel {
            AdapterSelection::None => Ok(None),
            AdapterSelection::All(id) => {
                let adapter = self.get_by_id(*id)?;
                match adapter.weights.get(site) {
                    None => Ok(None),
                    Some(w) => {
                        self.check_input(site, x)?;
                        Ok(Some(self.apply(
                            w,
                            adapter.scale(),
                            self.dropout_of(adapter),
                            x,
                        )?))
                    }
                }
            }
            AdapterSelection::PerRow(rows) => {
                let batch = x.size().first().copied().unwrap_or(0);
                if rows.len() as i64 != batch {
                    return Err(LoraError::SelectionRows {
                        expected: batch,
                        found: rows.len(),
                    });
                }
                // Group rows by adapter, keeping only adapters that target this site.
                let mut groups: BTreeMap<AdapterId, Vec<i64>> = BTreeMap::new();
                for (i, id) in rows.iter().enumerate() {
                    if let Some(id) = id {
                        groups.entry(*id).or_default().push(i as i64);
                    }
                }
                let positions = match (x.size().last(), batch) {
                    (Some(&width), b) if width > 0 && b > 0 => x.numel() as i64 / (width * b),
                    _ => 0,
                };
                let gather = match self.strategy {
                    DeltaStrategy::Gathered => true,
                    DeltaStrategy::Grouped => false,
                    DeltaStrategy::Auto => positions >= AUTO_GATHER_MIN_POSITIONS,
                };
                // Gathering shares one input among the adapters; with dropout each adapter
                // drops its own copy, as PEFT's per-adapter dropout modules do.
                let dropping = self.training
                    && groups
                        .keys()
                        .any(|id| self.get_by_id(*id).is_ok_and(|a| self.dropout_of(a) > 0.0));
                if gather && !dropping && groups.len() > 1 {
                    return self.delta_gathered(site, x, rows, &groups);
                }
                let mut out: Option<Tensor> = None;
                for (id, idx) in groups {
                    let adapter = self.get_by_id(id)?;
                    let Some(w) = adapter.weights.get(site) else {
                        continue;
                    };
                    self.check_input(site, x)?;
                    if idx.len() as i64 == batch {
                        // Every row uses this adapter: no gather needed.
                        return Ok(Some(self.apply(
                            w,
                            adapter.scale(),
                            self.dropout_of(adapter),
                            x,
                        )?));
                    }
                    let index = Tensor::f_from_slice(&idx)?.f_to_device(x.device())?;
                    let xs = x.f_index_select(0, &index)?;
                    let d = self.apply(w, adapter.scale(), self.dropout_of(adapter), &xs)?;
                    let acc = match out.take() {
                        Some(acc) => acc,
                        None => {
                            let mut shape = d.size();
                            shape[0] = batch;
                            Tensor::f_zeros(shape, (d.kind(), d.device()))?
                        }
                    };
                    out = Some(acc.f_index_add(0, &index, &d)?);
                }
                Ok(out)
            }
        }
    }

    /// [`delta`](AdapterBank::delta) addressed by layer and PEFT module name (`q_proj`,
    /// `self_attn.q_proj`, `gate_up_proj`, ...), as a model's forward pass names its linears.
    /// An unknown module name has no adapter: `Ok(None)`.
    pub fn delta_at(
        &self,
        layer: usize,
        module: &str,
        x: &Tensor,
        sel: &AdapterSelection,
    ) -> Result<Option<Tensor>> {
        match crate::site::Module::from_name(module) {
            Some(m) => self.delta(&Site::new(layer, m), x, sel),
            None => Ok(None),
        }
    }

    /// Binds a selection to this bank, for passing to a model's forward pass.
    pub fn select<'a>(&'a self, selection: &'a AdapterSelection) -> SelectedAdapters<'a> {
        SelectedAdapters {
            bank: self,
            selection,
        }
    }

    /// Per-row delta by gathering each row's factors and two batched matmuls.
    fn delta_gathered(
        &self,
        site: &Site,
        x: &Tensor,
        rows: &[Option<AdapterId>],
        groups: &BTreeMap<AdapterId, Vec<i64>>,
    ) -> Result<Option<Tensor>> {
        let mut slots: BTreeMap<AdapterId, i64> = BTreeMap::new();
        let mut a_list = vec![];
        let mut b_list = vec![];
        let mut r_max = 0;
        for id in groups.keys() {
            let adapter = self.get_by_id(*id)?;
            if let Some(w) = adapter.weights.get(site) {
                r_max = r_max.max(adapter.config.r as i64);
                slots.insert(*id, a_list.len() as i64 + 1);
                a_list.push(w.a.shallow_clone());
                b_list.push(w.b.f_mul_scalar(adapter.scale())?);
            }
        }
        if slots.is_empty() {
            return Ok(None);
        }
        self.check_input(site, x)?;
        let shape = self.shape_of(site)?;
        let (inp, out) = (shape.in_features as i64, shape.out_features as i64);
        let opts = (self.kind, self.device);
        // Slot 0 is a zero adapter for rows without one at this site.
        let mut a_stack = vec![Tensor::f_zeros([r_max, inp], opts)?];
        let mut b_stack = vec![Tensor::f_zeros([out, r_max], opts)?];
        for (a, b) in a_list.iter().zip(&b_list) {
            let pad = r_max - a.size()[0];
            a_stack.push(a.f_constant_pad_nd([0, 0, 0, pad])?);
            b_stack.push(b.f_constant_pad_nd([0, pad])?);
        }
        let a_all = Tensor::f_stack(&a_stack, 0)?; // [K+1, r, in]
        let b_all = Tensor::f_stack(&b_stack, 0)?; // [K+1, out, r]
        let idx: Vec<i64> = rows
            .iter()
            .map(|r| r.and_then(|id| slots.get(&id).copied()).unwrap_or(0))
            .collect();
        let index = Tensor::f_from_slice(&idx)?.f_to_device(self.device)?;
        let a_rows = a_all.f_index_select(0, &index)?; // [B, r, in]
        let b_rows = b_all.f_index_select(0, &index)?; // [B, out, r]
        let size = x.size();
        let batch = size[0];
        let xk = x
            .f_to_kind(self.kind)?
            .f_to_device(self.device)?
            .f_reshape([batch, -1, inp])?;
        let h = xk.f_bmm(&a_rows.f_transpose(1, 2)?)?;
        let d = h.f_bmm(&b_rows.f_transpose(1, 2)?)?;
        let mut out_shape = size.clone();
        if let Some(last) = out_shape.last_mut() {
            *last = out;
        }
        Ok(Some(d.f_reshape(out_shape)?.f_to_kind(x.kind())?))
    }

    fn check_input(&self, site: &Site, x: &Tensor) -> Result<()> {
        let expected = self.shape_of(site)?.in_features as i64;
        let found = x.size().last().copied().unwrap_or(0);
        if found != expected {
            return Err(LoraError::InputShape {
                site: site.to_string(),
                expected,
                found,
            });
        }
        Ok(())
    }

    fn apply(&self, w: &LoraWeights, scale: f64, dropout: f64, x: &Tensor) -> Result<Tensor> {
        let xk = if x.kind() == self.kind {
            x.shallow_clone()
        } else {
            x.f_to_kind(self.kind)?
        };
        let xk = if dropout > 0.0 {
            xk.f_dropout(dropout, true)?
        } else {
            xk
        };
        let h = xk.f_matmul(&w.a.f_tr()?)?;
        let d = h.f_matmul(&w.b.f_tr()?)?.f_mul_scalar(scale)?;
        if d.kind() == x.kind() {
            Ok(d)
        } else {
            Ok(d.f_to_kind(x.kind())?)
        }
    }

    /// `scale · B·A` for one site of an adapter, `[out, in]`, in the bank's kind.
    pub fn merged_delta_weight(&self, name: &str, site: &Site) -> Result<Option<Tensor>> {
        let adapter = self.get(name)?;
        match adapter.weights.get(site) {
            None => Ok(None),
            Some(w) => Ok(Some(
                tch::no_grad(|| w.b.f_matmul(&w.a))?.f_mul_scalar(adapter.scale())?,
            )),
        }
    }
}

/// A bank with the adapter selection of the current batch bound in: what a model's forward pass
/// needs to add LoRA deltas (see [`SelectedAdapters::delta`]).
#[derive(Clone, Copy, Debug)]
pub struct SelectedAdapters<'a> {
    /// The bank.
    pub bank: &'a AdapterBank,
    /// Which adapter each row uses.
    pub selection: &'a AdapterSelection,
}

impl SelectedAdapters<'_> {
    /// The LoRA delta for `module` (PEFT name) of `layer` given its input `x` `[B, T, in]`.
    pub fn delta(&self, layer: usize, module: &str, x: &Tensor) -> Result<Option<Tensor>> {
        self.bank.delta_at(layer, module, x, self.selection)
    }

    /// The factors and scale that every row uses at `module` (PEFT name) of `layer`: `Some`
    /// only when the selection is one adapter for the whole batch, that adapter adapts the
    /// site and drops nothing now (no training-mode dropout). For callers with their own
    /// kernel for the one-adapter case; their delta must equal [`Self::delta`]'s,
    /// `scale · (x Aᵀ) Bᵀ`.
    pub fn uniform_weights(
        &self,
        layer: usize,
        module: &str,
    ) -> Result<Option<(&LoraWeights, f64)>> {
        Ok(self.uniform_site(layer, module)?.flatten())
    }

    /// What every row of the batch adds at `module` (PEFT name) of `layer`, where that is one
    /// thing for the whole batch: `Some(None)` when nothing does (no adapter selected, or the
    /// selected one does not adapt the site, or an unknown module name), `Some(Some((w,
    /// scale)))` for one adapter's factors without training-mode dropout. `None` otherwise
    /// (rows use different adapters, or dropout draws random numbers).
    #[allow(clippy::type_complexity)]
    pub fn uniform_site(
        &self,
        layer: usize,
        module: &str,
    ) -> Result<Option<Option<(&LoraWeights, f64)>>> {
        let id = match self.selection {
            AdapterSelection::None => return Ok(Some(None)),
            AdapterSelection::All(id) => *id,
            AdapterSelection::PerRow(_) => return Ok(None),
        };
        let Some(m) = crate::site::Module::from_name(module) else {
            return Ok(Some(None));
        };
        let adapter = self.bank.get_by_id(id)?;
        let Some(w) = adapter.weights.get(&Site::new(layer, m)) else {
            return Ok(Some(None));
        };
        if self.bank.dropout_of(adapter) > 0.0 {
            return Ok(None);
        }
        Ok(Some(Some((w, adapter.scale()))))
    }
}
