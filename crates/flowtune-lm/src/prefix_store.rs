//! Keys and values of recent prompts (classified, or generated from), kept so that a later
//! prompt under the same adapter that starts with the same tokens computes only the rest.
//!
//! A flow re-asks about the same text many times: the MuSiQue relevance node scores every
//! unused paragraph again in each retrieval round (with the paragraph placed before the
//! changing query, the paragraph's keys and values are reusable), and the stop and query nodes'
//! prompts of round k extend those of round k - 1. Entries are whole prompts; a lookup returns
//! the entry with the longest common prefix. A new prompt replaces the entries it extends and
//! those it shares more than half of (their heads live on in it). The store holds at most a
//! byte budget (least recently used entries go first) and must be cleared whenever an adapter
//! changes, because keys and values depend on it ([`crate::engine::Engine`] does this on every
//! mutable access to its bank).
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

fn tensor_bytes(keys: &[Tensor], values: &[Tensor]) -> usize {
    keys.iter()
        .chain(values)
        .map(|t| t.numel() * t.kind().elt_size_in_bytes())
        .sum()
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

    /// Whether an entry under `adapter` already holds all of `ids` (as itself or a prefix), so
    /// that storing `ids` would change nothing.
    pub(crate) fn covers(&self, adapter: Option<&str>, ids: &[u32]) -> bool {
        self.entries.iter().any(|e| {
            e.adapter.as_deref() == adapter
                && e.ids.len() >= ids.len()
                && e.ids[..ids.len()] == *ids
        })
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
        if self.covers(adapter, ids) {
            return Ok(());
        }
        let same = |e: &StoredPrefix| e.adapter.as_deref() == adapter;
        // `ids` replaces every entry it extends, and every entry it leaves only after more than
        // half of that entry's tokens: the shared head, which `ids` holds too, is what later
        // prompts reuse (a paragraph and question before a changing query; the found paragraphs
        // before the next one), while the old tail served one prompt. Keeping such tails, each
        // retrieval round would add a whole prompt per paragraph and push out the entries that
        // the next round needs.
        let mut freed = 0;
        self.entries.retain(|e| {
            let common = e.ids.iter().zip(ids).take_while(|(a, b)| a == b).count();
            let replaced = same(e) && (common == e.ids.len() || 2 * common > e.ids.len());
            if replaced {
                freed += e.bytes;
            }
            !replaced
        });
        self.used_bytes -= freed;
        let bytes = tensor_bytes(&keys, &values);
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

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use tch::Kind;

    /// Two layers of keys/values `[1, len, 2]` whose slot `s` holds the value `s`.
    fn kv(len: usize) -> (Vec<Tensor>, Vec<Tensor>) {
        let t = || {
            Tensor::arange(len as i64, (Kind::Float, tch::Device::Cpu))
                .view([1, len as i64, 1])
                .repeat([1, 1, 2])
        };
        (vec![t(), t()], vec![t(), t()])
    }

    fn insert(s: &mut PrefixStore, ids: &[u32]) {
        let (k, v) = kv(ids.len());
        s.insert(Some("a"), ids, k, v).unwrap();
    }

    #[test]
    fn a_prompt_replaces_entries_it_extends_or_leaves_late() {
        let mut s = PrefixStore::new(1 << 20);
        let first: Vec<u32> = (0..20).collect();
        insert(&mut s, &first);
        assert_eq!(s.used_bytes, 2 * 2 * 20 * 2 * 4);
        // Shares 15 of the stored 20 tokens (more than half): it replaces the stored prompt,
        // and a later prompt still finds the 15-token head in it.
        let second: Vec<u32> = (0..15).chain(100..110).collect();
        insert(&mut s, &second);
        assert_eq!(s.entries.len(), 1);
        assert_eq!(s.entries[0].ids, second);
        assert_eq!(s.used_bytes, 2 * 2 * 25 * 2 * 4);
        let third: Vec<u32> = (0..15).chain(200..212).collect();
        let (i, common) = s.lookup(Some("a"), &third, third.len() - 1).unwrap();
        assert_eq!(common, 15);
        assert_eq!(s.entry(i).unwrap().keys[1].double_value(&[0, 14, 1]), 14.0);
        // A prompt extending a stored one replaces it as well.
        let longer: Vec<u32> = second.iter().copied().chain(300..305).collect();
        insert(&mut s, &longer);
        assert_eq!(s.entries.len(), 1);
        assert_eq!(s.entries[0].ids, longer);
        assert_eq!(s.used_bytes, 2 * 2 * 30 * 2 * 4);
        // One that the store already covers changes nothing.
        insert(&mut s, &longer[..12]);
        assert_eq!(s.entries.len(), 1);
    }

    #[test]
    fn an_early_divergence_or_another_adapter_leaves_the_entry_whole() {
        let mut s = PrefixStore::new(1 << 20);
        let first: Vec<u32> = (0..20).collect();
        insert(&mut s, &first);
        // Shares only 10 of 20 (not more than half): a different paragraph after a shared
        // system prompt, say.
        let other: Vec<u32> = (0..10).chain(50..70).collect();
        insert(&mut s, &other);
        assert_eq!(s.entries[0].ids.len(), 20);
        // Another adapter's prompt never touches this adapter's entries.
        let (k, v) = kv(19);
        s.insert(Some("b"), &(0..19).collect::<Vec<u32>>(), k, v)
            .unwrap();
        assert_eq!(s.entries[0].ids.len(), 20);
        assert_eq!(s.lookup(Some("b"), &first, 19).map(|h| h.1), Some(19));
    }

    #[test]
    fn the_budget_evicts_the_least_recently_used_entry() {
        let one = 2 * 2 * 10 * 2 * 4;
        let mut s = PrefixStore::new(2 * one);
        insert(&mut s, &(0..10).collect::<Vec<u32>>());
        insert(&mut s, &(100..110).collect::<Vec<u32>>());
        // Touch the first, so the second is the least recently used.
        assert!(s
            .lookup(Some("a"), &(0..10).collect::<Vec<u32>>(), 9)
            .is_some());
        insert(&mut s, &(200..210).collect::<Vec<u32>>());
        assert_eq!(s.used_bytes, 2 * one);
        let firsts: Vec<u32> = s.entries.iter().map(|e| e.ids[0]).collect();
        assert!(firsts.contains(&0) && firsts.contains(&200) && !firsts.contains(&100));
    }
}
