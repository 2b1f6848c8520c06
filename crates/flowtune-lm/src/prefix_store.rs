//! Keys and values of recently classified prompts, kept so that a later prompt under the same
//! adapter that starts with the same tokens computes only the rest.
//!
//! A flow re-asks about the same text many times: the MuSiQue relevance node scores every
//! unused paragraph again in each retrieval round (with the paragraph placed before the
//! changing query, the paragraph's keys and values are reusable), and the stop node's prompt of
//! round k extends that of round k - 1. Entries are whole prompts; a lookup returns the entry
//! with the longest common prefix. The store holds at most a byte budget (least recently used
//! entries go first) and must be cleared whenever an adapter changes, because keys and values
//! depend on it ([`crate::engine::Engine`] does this on every mutable access to its bank).
use tch::Tensor;

use crate::Result;

/// One stored prompt: per-layer keys and values `[kv_heads, len, head_dim]`.
#[derive(Debug)]
pub(crate) struct StoredPrefix {
    adapter: Option<String>,
    ids: Vec<u32>,
    pub(crate) keys: Vec<Tensor>,
    pub(crate) values: Vec<Tensor>,
    bytes: usize,
    last_used: u64,
}

/// The store (see the module docs).
#[derive(Debug, Default)]
pub(crate) struct PrefixStore {
    entries: Vec<StoredPrefix>,
    budget_bytes: usize,
    used_bytes: usize,
    clock: u64,
    /// Prompt tokens served from the store (counted by the caller when it uses a hit) and
    /// prompt tokens looked up.
    pub(crate) hits_tokens: usize,
    pub(crate) lookup_tokens: usize,
}

impl PrefixStore {
    pub(crate) fn new(budget_bytes: usize) -> Self {
        Self {
            budget_bytes,
            ..Default::default()
        }
    }

    pub(crate) fn enabled(&self) -> bool {
        self.budget_bytes > 0
    }

    pub(crate) fn clear(&mut self) {
        self.entries.clear();
        self.used_bytes = 0;
    }

    /// The entry sharing the longest prefix with `ids` under `adapter`, and that length
    /// (capped at `max_len`); `None` when nothing matches at all.
    pub(crate) fn lookup(
        &mut self,
        adapter: Option<&str>,
        ids: &[u32],
        max_len: usize,
    ) -> Option<(usize, usize)> {
        self.clock += 1;
        self.lookup_tokens += ids.len();
        let mut best: Option<(usize, usize)> = None;
        for (i, e) in self.entries.iter().enumerate() {
            if e.adapter.as_deref() != adapter {
                continue;
            }
            let common = e
                .ids
                .iter()
                .zip(ids)
                .take_while(|(a, b)| a == b)
                .count()
                .min(max_len);
            if common > 0 && best.is_none_or(|(_, c)| common > c) {
                best = Some((i, common));
            }
        }
        if let Some((i, _)) = best {
            self.entries[i].last_used = self.clock;
        }
        best
    }

    pub(crate) fn entry(&self, i: usize) -> Option<&StoredPrefix> {
        self.entries.get(i)
    }

    /// Keep `ids`' keys and values (per layer `[kv_heads, len, head_dim]`). An entry that is a
    /// prefix of `ids` is replaced; when `ids` is a prefix of an entry nothing changes.
    pub(crate) fn insert(
        &mut self,
        adapter: Option<&str>,
        ids: &[u32],
        keys: Vec<Tensor>,
        values: Vec<Tensor>,
    ) -> Result<()> {
        if !self.enabled() {
            return Ok(());
        }
        let same = |e: &StoredPrefix| e.adapter.as_deref() == adapter;
        if self
            .entries
            .iter()
            .any(|e| same(e) && e.ids.len() >= ids.len() && e.ids[..ids.len()] == *ids)
        {
            return Ok(());
        }
        let mut freed = 0;
        self.entries.retain(|e| {
            let covered = same(e) && e.ids.len() < ids.len() && ids[..e.ids.len()] == *e.ids;
            if covered {
                freed += e.bytes;
            }
            !covered
        });
        self.used_bytes -= freed;
        let bytes: usize = keys
            .iter()
            .chain(&values)
            .map(|t| t.numel() * t.kind().elt_size_in_bytes())
            .sum();
        if bytes > self.budget_bytes {
            return Ok(());
        }
        while self.used_bytes + bytes > self.budget_bytes {
            let Some((oldest, _)) = self
                .entries
                .iter()
                .enumerate()
                .min_by_key(|(_, e)| e.last_used)
            else {
                break;
            };
            let e = self.entries.swap_remove(oldest);
            self.used_bytes -= e.bytes;
        }
        self.clock += 1;
        self.used_bytes += bytes;
        self.entries.push(StoredPrefix {
            adapter: adapter.map(String::from),
            ids: ids.to_vec(),
            keys,
            values,
            bytes,
            last_used: self.clock,
        });
        Ok(())
    }
}
