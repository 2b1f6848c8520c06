//! Merging an adapter into the base weights (single-adapter deployment) and undoing it.

use tch::Tensor;

use crate::bank::AdapterBank;
use crate::error::{LoraError, Result};
use crate::site::Site;

/// Access to the base model's linear weights (`[out_features, in_features]`), implemented by the
/// model so an adapter can be merged into it.
pub trait BaseLinears {
    /// The weight of the linear layer at `site`, if the model has one there, as a tensor sharing
    /// storage with the model's weight (a `shallow_clone`, or a `narrow` view of a fused q/k/v or
    /// gate/up weight): merging adds to it in place.
    fn base_weight(&mut self, site: &Site) -> Option<Tensor>;
}

impl BaseLinears for std::collections::BTreeMap<Site, Tensor> {
    fn base_weight(&mut self, site: &Site) -> Option<Tensor> {
        self.get(site).map(Tensor::shallow_clone)
    }
}

impl AdapterBank {
    fn merge_signed(&self, name: &str, base: &mut dyn BaseLinears, sign: f64) -> Result<()> {
        let adapter = self.get(name)?;
        let sites: Vec<Site> = adapter.sites().copied().collect();
        // Check every site first so a failure leaves the base untouched.
        for site in &sites {
            let expected = self
                .base_shapes()
                .get(site)
                .map(|s| vec![s.out_features as i64, s.in_features as i64]);
            let w = base
                .base_weight(site)
                .ok_or_else(|| LoraError::BaseWeight {
                    site: site.to_string(),
                    reason: "the model exposes no weight there".into(),
                })?;
            let found = w.size();
            if Some(&found) != expected.as_ref() {
                return Err(LoraError::ShapeMismatch {
                    key: format!("{site}.weight"),
                    expected: expected.unwrap_or_default(),
                    found,
                });
            }
        }
        for site in &sites {
            let Some(delta) = self.merged_delta_weight(name, site)? else {
                continue;
            };
            let Some(mut w) = base.base_weight(site) else {
                continue; // checked above
            };
            let delta = delta
                .f_mul_scalar(sign)?
                .f_to_device(w.device())?
                .f_to_kind(w.kind())?;
            let _ = tch::no_grad(|| w.f_add_(&delta))?;
        }
        Ok(())
    }

    /// Adds `scale·B·A` of adapter `name` to the base weights (in the weights' kind). Serve with
    /// [`crate::AdapterSelection::None`] afterwards. All target sites are checked before any
    /// weight changes.
    pub fn merge_into(&self, name: &str, base: &mut dyn BaseLinears) -> Result<()> {
        let _span = tracing::debug_span!("lora_merge", adapter = name).entered();
        self.merge_signed(name, base, 1.0)
    }

    /// Subtracts `scale·B·A` of adapter `name` from the base weights, undoing [`merge_into`]
    /// (exact up to rounding in the weights' kind; the adapter must not have changed since).
    ///
    /// [`merge_into`]: AdapterBank::merge_into
    pub fn unmerge_from(&self, name: &str, base: &mut dyn BaseLinears) -> Result<()> {
        let _span = tracing::debug_span!("lora_unmerge", adapter = name).entered();
        self.merge_signed(name, base, -1.0)
    }
}
