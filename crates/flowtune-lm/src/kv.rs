//! The key/value cache: preallocated per-layer tensors written in place, plus
//! per-slot validity and positions so that rows of a batch may be ragged
//! (left padding, right padding, a shared prefix expanded to many rows).
use tch::{Device, Kind, Tensor};

use crate::{Error, Result};

/// Per-layer keys and values `[batch, kv_heads, capacity, head_dim]`, with
/// `valid[b, s]` (slot `s` of row `b` holds a real token) and `positions[b, s]`
/// (its RoPE position). Slots `0..len()` are filled; every row shares the slot
/// index, so a step writes all rows at the same slots.
#[derive(Debug)]
pub struct KvCache {
    keys: Vec<Tensor>,
    values: Vec<Tensor>,
    valid: Tensor,
    positions: Tensor,
    next_position: Vec<i64>,
    any_padding: bool,
    len: usize,
    capacity: usize,
    batch: usize,
    kv_heads: i64,
    head_dim: i64,
    device: Device,
    kind: Kind,
}

impl KvCache {
    /// An empty cache for `layers` layers, `batch` rows and room for `capacity` slots.
    pub fn new(
        layers: usize,
        batch: usize,
        kv_heads: usize,
        head_dim: usize,
        capacity: usize,
        device: Device,
        kind: Kind,
    ) -> Result<Self> {
        let capacity = capacity.max(1);
        let shape = [
            batch as i64,
            kv_heads as i64,
            capacity as i64,
            head_dim as i64,
        ];
        let mut keys = Vec::with_capacity(layers);
        let mut values = Vec::with_capacity(layers);
        for _ in 0..layers {
            keys.push(Tensor::f_zeros(shape, (kind, device))?);
            values.push(Tensor::f_zeros(shape, (kind, device))?);
        }
        Ok(Self {
            keys,
            values,
            valid: Tensor::f_zeros([batch as i64, capacity as i64], (Kind::Bool, device))?,
            positions: Tensor::f_zeros([batch as i64, capacity as i64], (Kind::Int64, device))?,
            next_position: vec![0; batch],
            any_padding: false,
            len: 0,
            capacity,
            batch,
            kv_heads: kv_heads as i64,
            head_dim: head_dim as i64,
            device,
            kind,
        })
    }

    /// Slots filled so far.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Whether no slot is filled.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Rows.
    pub fn batch(&self) -> usize {
        self.batch
    }

    /// Allocated slots.
    pub fn capacity(&self) -> usize {
        self.capacity
    }

    /// Position the next real token of each row gets.
    pub fn next_positions(&self) -> &[i64] {
        &self.next_position
    }

    /// Validity (`valid = true`) or positions of slots `0..total`, including
    /// slots appended by the step in progress.
    pub(crate) fn slots_view(&self, total: i64, valid: bool) -> Result<Tensor> {
        let src = if valid { &self.valid } else { &self.positions };
        Ok(src.f_narrow(1, 0, total)?)
    }

    /// Whether any slot written so far is padding.
    pub fn has_padding(&self) -> bool {
        self.any_padding
    }

    /// Validity of filled slots `[batch, len]`.
    pub fn valid(&self) -> Result<Tensor> {
        Ok(self.valid.f_narrow(1, 0, self.len as i64)?)
    }

    /// Positions of filled slots `[batch, len]`.
    pub fn positions(&self) -> Result<Tensor> {
        Ok(self.positions.f_narrow(1, 0, self.len as i64)?)
    }

    /// Make room for `extra` more slots, reallocating (doubling) when needed.
    pub fn reserve(&mut self, extra: usize) -> Result<()> {
        let need = self.len + extra;
        if need <= self.capacity {
            return Ok(());
        }
        let new_cap = need.max(self.capacity * 2);
        let grow = |t: &Tensor, dim: i64| -> Result<Tensor> {
            let mut shape = t.size();
            shape[dim as usize] = new_cap as i64;
            let fresh = Tensor::f_zeros(shape.as_slice(), (t.kind(), t.device()))?;
            fresh
                .f_narrow(dim, 0, self.len as i64)?
                .f_copy_(&t.f_narrow(dim, 0, self.len as i64)?)?;
            Ok(fresh)
        };
        for i in 0..self.keys.len() {
            self.keys[i] = grow(&self.keys[i], 2)?;
            self.values[i] = grow(&self.values[i], 2)?;
        }
        self.valid = grow(&self.valid, 1)?;
        self.positions = grow(&self.positions, 1)?;
        self.capacity = new_cap;
        Ok(())
    }

    /// Record the validity and positions of `t` new slots (host data, row-major
    /// `[batch, t]`) and return the positions as a `[batch, t]` tensor. Padding
    /// slots get the position of the row's next token (they are never attended).
    pub(crate) fn append_slots(&mut self, valid: &[bool], t: usize) -> Result<(Tensor, Tensor)> {
        if valid.len() != self.batch * t {
            return Err(Error::ModelInput(format!(
                "validity mask has {} entries, expected batch {} x {t}",
                valid.len(),
                self.batch
            )));
        }
        self.reserve(t)?;
        if valid.iter().any(|&v| !v) {
            self.any_padding = true;
        }
        let mut pos = Vec::with_capacity(self.batch * t);
        for b in 0..self.batch {
            for i in 0..t {
                pos.push(self.next_position[b]);
                if valid[b * t + i] {
                    self.next_position[b] += 1;
                }
            }
        }
        let pos_t = Tensor::f_from_slice(&pos)?
            .f_view([self.batch as i64, t as i64])?
            .f_to(self.device)?;
        let valid_t = Tensor::f_from_slice(valid)?
            .f_view([self.batch as i64, t as i64])?
            .f_to(self.device)?;
        self.positions
            .f_narrow(1, self.len as i64, t as i64)?
            .f_copy_(&pos_t)?;
        self.valid
            .f_narrow(1, self.len as i64, t as i64)?
            .f_copy_(&valid_t)?;
        Ok((pos_t, valid_t))
    }

    /// Write layer `layer`'s new keys/values `[batch, kv_heads, t, head_dim]` at
    /// slots `start..start+t` and return views of slots `0..start+t`.
    pub(crate) fn write_layer(
        &mut self,
        layer: usize,
        start: usize,
        k: &Tensor,
        v: &Tensor,
    ) -> Result<(Tensor, Tensor)> {
        let t = k.size()[2];
        let end = start as i64 + t;
        let kc = self
            .keys
            .get(layer)
            .ok_or_else(|| Error::ModelInput(format!("cache has no layer {layer}")))?;
        let vc = &self.values[layer];
        kc.f_narrow(2, start as i64, t)?.f_copy_(k)?;
        vc.f_narrow(2, start as i64, t)?.f_copy_(v)?;
        Ok((kc.f_narrow(2, 0, end)?, vc.f_narrow(2, 0, end)?))
    }

    /// Mark `t` slots as filled (after every layer has written them).
    pub(crate) fn commit(&mut self, t: usize) {
        self.len += t;
    }

    /// Keep rows `rows` (in that order; repeats allowed): beam reordering,
    /// expanding a shared prefix to many rows, dropping finished rows.
    pub fn select_rows(&mut self, rows: &[usize]) -> Result<()> {
        let idx: Vec<i64> = rows.iter().map(|&r| r as i64).collect();
        if let Some(&bad) = rows.iter().find(|&&r| r >= self.batch) {
            return Err(Error::ModelInput(format!(
                "row {bad} out of range for batch {}",
                self.batch
            )));
        }
        let idx_t = Tensor::f_from_slice(&idx)?.f_to(self.device)?;
        let used = self.len as i64;
        // Only the filled slots are copied; the rest of the capacity stays zero.
        let pick = |t: &Tensor, dim: i64| -> Result<Tensor> {
            let mut shape = t.size();
            shape[0] = rows.len() as i64;
            let fresh = Tensor::f_zeros(shape.as_slice(), (t.kind(), t.device()))?;
            if used > 0 {
                let src = t.f_narrow(dim, 0, used)?.f_index_select(0, &idx_t)?;
                fresh.f_narrow(dim, 0, used)?.f_copy_(&src)?;
            }
            Ok(fresh)
        };
        for i in 0..self.keys.len() {
            self.keys[i] = pick(&self.keys[i], 2)?;
            self.values[i] = pick(&self.values[i], 2)?;
        }
        self.valid = pick(&self.valid, 1)?;
        self.positions = pick(&self.positions, 1)?;
        self.next_position = rows.iter().map(|&r| self.next_position[r]).collect();
        self.batch = rows.len();
        Ok(())
    }

    /// Copies of the keys and values of row `row` at slots `slots` (in that order), per layer
    /// `[kv_heads, slots.len(), head_dim]`.
    pub(crate) fn row_slots(
        &self,
        row: usize,
        slots: &[i64],
    ) -> Result<(Vec<Tensor>, Vec<Tensor>)> {
        if row >= self.batch || slots.iter().any(|&s| s < 0 || s as usize >= self.len) {
            return Err(Error::ModelInput(format!(
                "row {row} slots out of range for batch {} x {} filled",
                self.batch, self.len
            )));
        }
        let idx = Tensor::f_from_slice(slots)?.f_to(self.device)?;
        let take =
            |t: &Tensor| -> Result<Tensor> { Ok(t.f_get(row as i64)?.f_index_select(1, &idx)?) };
        let keys = self.keys.iter().map(take).collect::<Result<Vec<_>>>()?;
        let values = self.values.iter().map(take).collect::<Result<Vec<_>>>()?;
        Ok((keys, values))
    }

    /// A cache whose row `i` starts with the first `prefixes[i].2` slots of the given per-layer
    /// keys and values (`[kv_heads, len, head_dim]`; positions `0..len`), the shorter rows padded
    /// up to the longest, with room for `extra` more slots. A row with length 0 starts empty.
    pub(crate) fn from_prefixes(
        prefixes: &[(&[Tensor], &[Tensor], usize)],
        kv_heads: usize,
        head_dim: usize,
        extra: usize,
        device: Device,
        kind: Kind,
        layers: usize,
    ) -> Result<Self> {
        let longest = prefixes.iter().map(|p| p.2).max().unwrap_or(0);
        let mut cache = Self::new(
            layers,
            prefixes.len(),
            kv_heads,
            head_dim,
            longest + extra,
            device,
            kind,
        )?;
        let mut valid = vec![false; prefixes.len() * longest];
        let mut pos = vec![0i64; prefixes.len() * longest];
        for (r, (keys, values, len)) in prefixes.iter().enumerate() {
            let len = *len;
            if len == 0 {
                continue;
            }
            if keys.len() != layers || values.len() != layers {
                return Err(Error::ModelInput(format!(
                    "stored prefix has {} layers, the model {layers}",
                    keys.len()
                )));
            }
            for l in 0..layers {
                for (dst, src) in [(&cache.keys[l], &keys[l]), (&cache.values[l], &values[l])] {
                    dst.f_get(r as i64)?
                        .f_narrow(1, 0, len as i64)?
                        .f_copy_(&src.f_narrow(1, 0, len as i64)?)?;
                }
            }
            for s in 0..len {
                valid[r * longest + s] = true;
                pos[r * longest + s] = s as i64;
            }
            cache.next_position[r] = len as i64;
        }
        if longest > 0 {
            let shape = [prefixes.len() as i64, longest as i64];
            cache
                .valid
                .f_narrow(1, 0, longest as i64)?
                .f_copy_(&Tensor::f_from_slice(&valid)?.f_view(shape)?.f_to(device)?)?;
            cache
                .positions
                .f_narrow(1, 0, longest as i64)?
                .f_copy_(&Tensor::f_from_slice(&pos)?.f_view(shape)?.f_to(device)?)?;
        }
        cache.any_padding = valid.iter().any(|&v| !v);
        cache.len = longest;
        Ok(cache)
    }

    /// Element kind of the stored keys and values.
    pub fn kind(&self) -> Kind {
        self.kind
    }

    /// Device of the cache.
    pub fn device(&self) -> Device {
        self.device
    }

    /// Key/value heads and head dimension.
    pub fn head_shape(&self) -> (i64, i64) {
        (self.kv_heads, self.head_dim)
    }
}
