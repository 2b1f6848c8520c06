//! Tokenizers (through the `tokenizers` crate) and HF chat templates.
//!
//! From an HF folder: `tokenizer.json`, with `tokenizer_config.json` (special tokens,
//! `chat_template`) or `chat_template.jinja`. From a GGUF file: the tokenizer is
//! rebuilt from `tokenizer.ggml.*` metadata the way transformers' GGUF conversion
//! does (`integrations/gguf/gguf_tokenizer_mapping.py`): byte-level BPE for
//! `tokenizer.ggml.model = "gpt2"`, tokens marked CONTROL added as special tokens,
//! USER_DEFINED ones as plain added tokens, and the split regex chosen by
//! `tokenizer.ggml.pre` when transformers knows it.
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use serde_json::{json, Map, Value as Json};

use crate::gguf::{GgufHeader, GgufValue};
use crate::{Error, Result};

pub mod chat_template;

pub use chat_template::ChatTemplate;

/// One chat message.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ChatMessage {
    /// `system`, `user`, `assistant`, ...
    pub role: String,
    /// The text.
    pub content: String,
}

impl ChatMessage {
    /// A message with the given role and content.
    pub fn new(role: impl Into<String>, content: impl Into<String>) -> Self {
        ChatMessage {
            role: role.into(),
            content: content.into(),
        }
    }
}

/// Named special tokens (as strings), as transformers exposes them to templates.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct SpecialTokens {
    /// Beginning of sequence.
    pub bos_token: Option<String>,
    /// End of sequence.
    pub eos_token: Option<String>,
    /// Unknown.
    pub unk_token: Option<String>,
    /// Padding.
    pub pad_token: Option<String>,
}

impl SpecialTokens {
    fn pairs(&self) -> Vec<(String, String)> {
        [
            ("bos_token", &self.bos_token),
            ("eos_token", &self.eos_token),
            ("unk_token", &self.unk_token),
            ("pad_token", &self.pad_token),
        ]
        .into_iter()
        .filter_map(|(k, v)| v.as_ref().map(|v| (k.to_string(), v.clone())))
        .collect()
    }
}

/// A tokenizer plus its chat template and special tokens.
pub struct Tokenizer {
    inner: tokenizers::Tokenizer,
    template: Option<ChatTemplate>,
    specials: SpecialTokens,
    eos_ids: Vec<u32>,
    source: PathBuf,
}

impl std::fmt::Debug for Tokenizer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Tokenizer")
            .field("source", &self.source)
            .field("vocab_size", &self.vocab_size())
            .field("specials", &self.specials)
            .field("eos_ids", &self.eos_ids)
            .field("chat_template", &self.template.is_some())
            .finish()
    }
}

/// GPT-2's byte → printable-character table (`bytes_to_unicode`).
pub fn bytes_to_unicode() -> [char; 256] {
    let mut table = ['\0'; 256];
    let mut n = 0u32;
    for b in 0..256u32 {
        let printable =
            (33..=126).contains(&b) || (161..=172).contains(&b) || (174..=255).contains(&b);
        let c = if printable {
            b
        } else {
            n += 1;
            255 + n
        };
        // Every value here is below 0x200 and so a valid scalar value.
        table[b as usize] = char::from_u32(c).unwrap_or('\0');
    }
    table
}

const CONTROL: i64 = 3;
const USER_DEFINED: i64 = 4;

/// The split regex transformers uses for a `tokenizer.ggml.pre` value, if any.
fn pre_split_regex(pre: &str) -> Option<&'static str> {
    const LLAMA3: &str = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";
    const TEKKEN: &str = r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+|[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+";
    const GPT4O: &str = r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+(?i:'s|'t|'re|'ve|'m|'ll|'d)?|[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*(?i:'s|'t|'re|'ve|'m|'ll|'d)?|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+";
    const QWEN2: &str = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";
    const QWEN35: &str = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?[\p{L}\p{M}]+|\p{N}| ?[^\s\p{L}\p{M}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";
    Some(match pre {
        "llama3" | "llama-v3" | "llama-bpe" | "falcon3" | "falcon-h1" | "pixtral" | "midm-2.0"
        | "lfm2" | "jina-v5-nano" | "dbrx" | "smaug-bpe" => LLAMA3,
        "tekken" => TEKKEN,
        "qwen2" | "deepseek-r1-qwen" | "kormo" | "f2llmv2" | "megrez" => QWEN2,
        "qwen35" => QWEN35,
        "gpt-4o" | "llama4" | "kanana2" | "talkie" | "minimax-m2" => GPT4O,
        _ => return None,
    })
}

fn string_array<'a>(h: &'a GgufHeader, key: &str, path: &Path) -> Result<Vec<&'a str>> {
    let arr = h
        .get(key)
        .and_then(GgufValue::as_array)
        .ok_or_else(|| Error::GgufMetadata {
            path: path.to_path_buf(),
            key: key.into(),
            reason: "missing or not an array".into(),
        })?;
    arr.iter()
        .enumerate()
        .map(|(i, v)| {
            v.as_str().ok_or_else(|| Error::GgufMetadata {
                path: path.to_path_buf(),
                key: key.into(),
                reason: format!("element {i} is not a string"),
            })
        })
        .collect()
}

/// The `tokenizer.json` document (as JSON) that transformers builds from a GGUF
/// file's tokenizer metadata.
pub fn gguf_tokenizer_json(h: &GgufHeader, path: &Path) -> Result<Json> {
    let model = h
        .get("tokenizer.ggml.model")
        .and_then(GgufValue::as_str)
        .ok_or_else(|| Error::GgufMetadata {
            path: path.to_path_buf(),
            key: "tokenizer.ggml.model".into(),
            reason: "missing or not a string".into(),
        })?;
    if model == "llama" {
        return sentencepiece_tokenizer_json(h, path);
    }
    if model != "gpt2" {
        return Err(Error::Unsupported {
            path: path.to_path_buf(),
            what: format!(
                "GGUF tokenizer model `{model}` (supported: `gpt2` byte-level BPE, `llama` SentencePiece BPE)"
            ),
        });
    }
    let tokens = string_array(h, "tokenizer.ggml.tokens", path)?;
    let types: Vec<i64> = match h
        .get("tokenizer.ggml.token_type")
        .and_then(GgufValue::as_array)
    {
        Some(a) => a.iter().map(|v| v.as_i64().unwrap_or(1)).collect(),
        None => Vec::new(),
    };
    let merges = string_array(h, "tokenizer.ggml.merges", path)?;
    let alphabet = bytes_to_unicode();
    let in_alphabet = |t: &str| t.chars().all(|c| alphabet.contains(&c));
    let mut vocab = Map::new();
    for (i, t) in tokens.iter().enumerate() {
        let key = if in_alphabet(t) {
            (*t).to_string()
        } else {
            t.bytes().map(|b| alphabet[b as usize]).collect()
        };
        vocab.insert(key, json!(i));
    }
    let merges: Vec<Json> = merges
        .iter()
        .map(|m| {
            let mut parts = m.split(' ');
            json!([parts.next().unwrap_or(""), parts.next().unwrap_or("")])
        })
        .collect();
    let mut added = Vec::new();
    for (i, (t, ty)) in tokens.iter().zip(types.iter()).enumerate() {
        let special = match *ty {
            CONTROL if in_alphabet(t) => true,
            USER_DEFINED if vocab.contains_key(*t) => false,
            _ => continue,
        };
        added.push(json!({
            "id": i, "content": t, "single_word": false, "lstrip": false, "rstrip": false,
            "normalized": false, "special": special
        }));
    }
    let pre = h
        .get("tokenizer.ggml.pre")
        .and_then(GgufValue::as_str)
        .unwrap_or("");
    let pre_tokenizer = match pre_split_regex(pre) {
        Some(re) => json!({"type": "Sequence", "pretokenizers": [
            {"type": "Split", "pattern": {"Regex": re}, "behavior": "Isolated", "invert": false},
            {"type": "ByteLevel", "add_prefix_space": false, "trim_offsets": true, "use_regex": false}
        ]}),
        None => {
            json!({"type": "ByteLevel", "add_prefix_space": false, "trim_offsets": true, "use_regex": true})
        }
    };
    Ok(json!({
        "version": "1.0",
        "truncation": null,
        "padding": null,
        "added_tokens": added,
        "normalizer": null,
        "pre_tokenizer": pre_tokenizer,
        "post_processor": null,
        "decoder": {"type": "ByteLevel", "add_prefix_space": true, "trim_offsets": true, "use_regex": true},
        "model": {
            "type": "BPE", "dropout": null, "unk_token": null, "continuing_subword_prefix": "",
            "end_of_word_suffix": "", "fuse_unk": false, "byte_fallback": false, "ignore_merges": false,
            "vocab": vocab, "merges": merges
        }
    }))
}

/// Merges implied by a vocabulary and its scores, as transformers'
/// `generate_merges(vocab, vocab_scores)`: for each token (in file order), every
/// split into two known pieces, ordered by the pieces' ids; then all merges sorted
/// by (score, left length, right length), highest first, ties in that order.
pub fn merges_from_scores(tokens: &[&str], scores: &[f64]) -> Vec<(String, String)> {
    let mut vocab: std::collections::HashMap<&str, usize> = std::collections::HashMap::new();
    for (i, t) in tokens.iter().enumerate() {
        vocab.insert(t, i);
    }
    // A dict built from zip(tokens, scores): the first position, the last score.
    let mut order: Vec<&str> = Vec::new();
    let mut score: std::collections::HashMap<&str, f64> = std::collections::HashMap::new();
    for (t, &sc) in tokens.iter().zip(scores) {
        if score.insert(t, sc).is_none() {
            order.push(t);
        }
    }
    let mut merges: Vec<(&str, &str, f64)> = Vec::new();
    for t in order {
        let sc = score.get(t).copied().unwrap_or(0.0);
        let mut local: Vec<(&str, &str, f64)> = t
            .char_indices()
            .skip(1)
            .map(|(i, _)| (&t[..i], &t[i..]))
            .filter(|(l, r)| vocab.contains_key(l) && vocab.contains_key(r))
            .map(|(l, r)| (l, r, sc))
            .collect();
        local.sort_by_key(|(l, r, _)| (vocab[l], vocab[r]));
        merges.extend(local);
    }
    let key = |m: &(&str, &str, f64)| (m.2, m.0.chars().count(), m.1.chars().count());
    // Stable sort, descending: equal keys keep their order, as Python's reverse=True.
    merges.sort_by(|a, b| {
        let (ka, kb) = (key(a), key(b));
        kb.0.total_cmp(&ka.0)
            .then(kb.1.cmp(&ka.1))
            .then(kb.2.cmp(&ka.2))
    });
    merges
        .into_iter()
        .map(|(l, r, _)| (l.to_string(), r.to_string()))
        .collect()
}

/// The `tokenizer.json` transformers builds for a SentencePiece-style (`llama`)
/// GGUF vocabulary: BPE with byte fallback over the pieces as spelled in the file,
/// merges from the file or derived from the scores, `Metaspace` pre-tokenizer
/// (prepend "first"), or for `phi3` a normalizer that prepends and replaces spaces.
fn sentencepiece_tokenizer_json(h: &GgufHeader, path: &Path) -> Result<Json> {
    let arch = h
        .get("general.architecture")
        .and_then(GgufValue::as_str)
        .unwrap_or("");
    let tokens = string_array(h, "tokenizer.ggml.tokens", path)?;
    let types: Vec<i64> = match h
        .get("tokenizer.ggml.token_type")
        .and_then(GgufValue::as_array)
    {
        Some(a) => a.iter().map(|v| v.as_i64().unwrap_or(1)).collect(),
        None => Vec::new(),
    };
    let merges: Vec<(String, String)> = if h.get("tokenizer.ggml.merges").is_some() {
        string_array(h, "tokenizer.ggml.merges", path)?
            .iter()
            .map(|m| {
                let mut p = m.split(' ');
                (
                    p.next().unwrap_or("").to_string(),
                    p.next().unwrap_or("").to_string(),
                )
            })
            .collect()
    } else {
        let scores: Vec<f64> = match h.get("tokenizer.ggml.scores").and_then(GgufValue::as_array) {
            Some(a) => a.iter().map(|v| v.as_f64().unwrap_or(0.0)).collect(),
            None => {
                return Err(Error::GgufMetadata {
                    path: path.to_path_buf(),
                    key: "tokenizer.ggml.scores".into(),
                    reason: "missing: needed to derive merges when tokenizer.ggml.merges is absent"
                        .into(),
                })
            }
        };
        if scores.len() != tokens.len() {
            return Err(Error::GgufMetadata {
                path: path.to_path_buf(),
                key: "tokenizer.ggml.scores".into(),
                reason: format!("{} scores for {} tokens", scores.len(), tokens.len()),
            });
        }
        merges_from_scores(&tokens, &scores)
    };
    let mut vocab = Map::new();
    for (i, t) in tokens.iter().enumerate() {
        vocab.insert((*t).to_string(), json!(i));
    }
    let mut added = Vec::new();
    for (i, (t, ty)) in tokens.iter().zip(types.iter()).enumerate() {
        let special = match *ty {
            CONTROL => true,
            USER_DEFINED => false,
            _ => continue,
        };
        added.push(json!({
            "id": i, "content": t, "single_word": false, "lstrip": false, "rstrip": false,
            "normalized": false, "special": special
        }));
    }
    let (normalizer, pre_tokenizer) = if arch == "phi3" {
        (
            json!({"type": "Sequence", "normalizers": [
                {"type": "Prepend", "prepend": "\u{2581}"},
                {"type": "Replace", "pattern": {"String": " "}, "content": "\u{2581}"}
            ]}),
            Json::Null,
        )
    } else {
        (
            Json::Null,
            json!({"type": "Metaspace", "replacement": "\u{2581}", "prepend_scheme": "first", "split": false}),
        )
    };
    let merges: Vec<Json> = merges.into_iter().map(|(l, r)| json!([l, r])).collect();
    Ok(json!({
        "version": "1.0",
        "truncation": null,
        "padding": null,
        "added_tokens": added,
        "normalizer": normalizer,
        "pre_tokenizer": pre_tokenizer,
        "post_processor": null,
        "decoder": {"type": "Sequence", "decoders": [
            {"type": "Replace", "pattern": {"String": "\u{2581}"}, "content": " "},
            {"type": "ByteFallback"},
            {"type": "Fuse"},
            {"type": "Strip", "content": " ", "start": 1, "stop": 0}
        ]},
        "model": {
            "type": "BPE", "dropout": null, "unk_token": null, "continuing_subword_prefix": null,
            "end_of_word_suffix": null, "fuse_unk": true, "byte_fallback": true, "ignore_merges": false,
            "vocab": vocab, "merges": merges
        }
    }))
}

fn tok_err(path: &Path, e: impl std::fmt::Display) -> Error {
    Error::Tokenizer {
        path: path.to_path_buf(),
        reason: e.to_string(),
    }
}

/// A special token in `tokenizer_config.json`: a string or an `AddedToken` object.
fn token_string(v: Option<&Json>) -> Option<String> {
    match v? {
        Json::String(s) => Some(s.clone()),
        Json::Object(o) => o.get("content").and_then(Json::as_str).map(str::to_string),
        _ => None,
    }
}

impl Tokenizer {
    /// Assemble a tokenizer from its parts; `eos_ids` is derived from `specials`
    /// when empty. `source` names the origin in errors.
    pub fn from_parts(
        inner: tokenizers::Tokenizer,
        chat_template: Option<&str>,
        specials: SpecialTokens,
        mut eos_ids: Vec<u32>,
        source: &Path,
    ) -> Result<Self> {
        let template = match chat_template {
            Some(t) => Some(ChatTemplate::new(t, source, specials.pairs())?),
            None => None,
        };
        if eos_ids.is_empty() {
            if let Some(id) = specials
                .eos_token
                .as_deref()
                .and_then(|t| inner.token_to_id(t))
            {
                eos_ids.push(id);
            }
        }
        Ok(Tokenizer {
            inner,
            template,
            specials,
            eos_ids,
            source: source.to_path_buf(),
        })
    }

    /// The tokenizer described by a GGUF file's metadata.
    pub fn from_gguf(h: &GgufHeader, path: &Path) -> Result<Self> {
        let doc = gguf_tokenizer_json(h, path)?;
        let inner = tokenizers::Tokenizer::from_bytes(doc.to_string().as_bytes())
            .map_err(|e| tok_err(path, e))?;
        let tokens = string_array(h, "tokenizer.ggml.tokens", path)?;
        let named = |key: &str| -> Option<String> {
            let id = h.get(key).and_then(GgufValue::as_u64)?;
            tokens.get(usize::try_from(id).ok()?).map(|s| s.to_string())
        };
        let specials = SpecialTokens {
            bos_token: named("tokenizer.ggml.bos_token_id"),
            eos_token: named("tokenizer.ggml.eos_token_id"),
            unk_token: named("tokenizer.ggml.unknown_token_id"),
            pad_token: named("tokenizer.ggml.padding_token_id"),
        };
        let mut eos_ids = Vec::new();
        if let Some(id) = h
            .get("tokenizer.ggml.eos_token_id")
            .and_then(GgufValue::as_u64)
        {
            eos_ids.push(id as u32);
        }
        if let Some(id) = h
            .get("tokenizer.ggml.eot_token_id")
            .and_then(GgufValue::as_u64)
        {
            if !eos_ids.contains(&(id as u32)) {
                eos_ids.push(id as u32);
            }
        }
        let template = h.get("tokenizer.chat_template").and_then(GgufValue::as_str);
        Self::from_parts(inner, template, specials, eos_ids, path)
    }

    /// The tokenizer of an HF folder: `tokenizer.json`, special tokens and chat
    /// template from `tokenizer_config.json`, `chat_template.jinja` taking precedence
    /// for the template.
    pub fn from_hf_dir(dir: &Path) -> Result<Self> {
        let tj = dir.join("tokenizer.json");
        if !tj.is_file() {
            return Err(Error::Tokenizer {
                path: tj,
                reason: "file not found".into(),
            });
        }
        let inner = tokenizers::Tokenizer::from_file(&tj).map_err(|e| tok_err(&tj, e))?;
        let tc_path = dir.join("tokenizer_config.json");
        let tc: Json = if tc_path.is_file() {
            let text = std::fs::read_to_string(&tc_path).map_err(|source| Error::Io {
                path: tc_path.clone(),
                source,
            })?;
            serde_json::from_str(&text)
                .map_err(|e| tok_err(&tc_path, format!("invalid JSON: {e}")))?
        } else {
            Json::Object(Map::new())
        };
        let specials = SpecialTokens {
            bos_token: token_string(tc.get("bos_token")),
            eos_token: token_string(tc.get("eos_token")),
            unk_token: token_string(tc.get("unk_token")),
            pad_token: token_string(tc.get("pad_token")),
        };
        let jinja = dir.join("chat_template.jinja");
        let (template, tpath): (Option<String>, PathBuf) = if jinja.is_file() {
            let t = std::fs::read_to_string(&jinja).map_err(|source| Error::Io {
                path: jinja.clone(),
                source,
            })?;
            (Some(t), jinja)
        } else {
            let t = match tc.get("chat_template") {
                Some(Json::String(s)) => Some(s.clone()),
                Some(Json::Array(list)) => list
                    .iter()
                    .find(|e| e.get("name").and_then(Json::as_str) == Some("default"))
                    .and_then(|e| e.get("template"))
                    .and_then(Json::as_str)
                    .map(str::to_string),
                Some(Json::Null) | None => None,
                Some(other) => {
                    return Err(tok_err(
                        &tc_path,
                        format!("field `chat_template`: unexpected value {other}"),
                    ))
                }
            };
            (t, tc_path)
        };
        let mut tok = Self::from_parts(inner, None, specials.clone(), Vec::new(), dir)?;
        if let Some(t) = template {
            tok.template = Some(ChatTemplate::new(&t, &tpath, specials.pairs())?);
        }
        Ok(tok)
    }

    /// Encode text without adding special tokens (special-token strings in the text
    /// are still recognised, as in transformers).
    pub fn encode(&self, text: &str) -> Result<Vec<u32>> {
        let enc = self
            .inner
            .encode(text, false)
            .map_err(|e| tok_err(&self.source, e))?;
        Ok(enc.get_ids().to_vec())
    }

    /// Decode ids, optionally skipping special tokens.
    pub fn decode(&self, ids: &[u32], skip_special: bool) -> Result<String> {
        self.inner
            .decode(ids, skip_special)
            .map_err(|e| tok_err(&self.source, e))
    }

    /// Render the chat template like transformers'
    /// `apply_chat_template(messages, tokenize=False, add_generation_prompt=...)`.
    pub fn apply_chat_template(
        &self,
        messages: &[ChatMessage],
        add_generation_prompt: bool,
    ) -> Result<String> {
        let t = self.template.as_ref().ok_or_else(|| Error::ChatTemplate {
            path: self.source.clone(),
            reason: "the tokenizer has no chat template".into(),
        })?;
        t.render(messages, add_generation_prompt)
    }

    /// The token ids of the rendered chat template.
    pub fn encode_chat(
        &self,
        messages: &[ChatMessage],
        add_generation_prompt: bool,
    ) -> Result<Vec<u32>> {
        let text = self.apply_chat_template(messages, add_generation_prompt)?;
        self.encode(&text)
    }

    /// Ids that end generation.
    pub fn eos_token_ids(&self) -> &[u32] {
        &self.eos_ids
    }

    /// Add ids that end generation (e.g. from the model config), keeping order.
    pub fn add_eos_token_ids(&mut self, ids: &[u32]) {
        for &id in ids {
            if !self.eos_ids.contains(&id) {
                self.eos_ids.push(id);
            }
        }
    }

    /// The id of a token string (added tokens included).
    pub fn token_to_id(&self, token: &str) -> Option<u32> {
        self.inner.token_to_id(token)
    }

    /// The token string of an id.
    pub fn id_to_token(&self, id: u32) -> Option<String> {
        self.inner.id_to_token(id)
    }

    /// Vocabulary size including added tokens.
    pub fn vocab_size(&self) -> usize {
        self.inner.get_vocab_size(true)
    }

    /// Named special tokens.
    pub fn special_tokens(&self) -> &SpecialTokens {
        &self.specials
    }

    /// The chat template, if any.
    pub fn chat_template(&self) -> Option<&ChatTemplate> {
        self.template.as_ref()
    }

    /// The underlying `tokenizers` tokenizer.
    pub fn inner(&self) -> &tokenizers::Tokenizer {
        &self.inner
    }

    /// Where the tokenizer was loaded from.
    pub fn source(&self) -> &Path {
        &self.source
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn byte_table_is_gpt2s() {
        let t = bytes_to_unicode();
        assert_eq!(t[b' ' as usize], '\u{120}');
        assert_eq!(t[b'a' as usize], 'a');
        assert_eq!(t[b'\n' as usize], '\u{10a}');
        let mut sorted = t.to_vec();
        sorted.sort_unstable();
        sorted.dedup();
        assert_eq!(sorted.len(), 256);
    }
}
