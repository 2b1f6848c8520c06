//! Chat templates rendered by flowtune (minijinja) are identical to transformers'
//! `apply_chat_template(..., tokenize=False, add_generation_prompt=False/True)`
//! (Jinja2), run by `lm_load_ref.py template` on the test model's tokenizer (its
//! special tokens) for: the test model's own template and several public templates
//! in the style of Llama 3, Mistral (rejects system messages), Qwen2 (whitespace
//! control), Phi-3, and a template exercising pycompat string methods, `tojson`,
//! namespaces, loop controls and Python value printing. Exact string comparison.
//! Where Jinja2 raises on a system message, flowtune merges it into the first user
//! message, so it must equal Jinja2's rendering of the merged conversation.
#![allow(clippy::unwrap_used, clippy::expect_used)]
mod loader_support;

use flowtune_lm::gguf::GgufFile;
use flowtune_lm::tokenizer::chat_template::{merge_system, ChatTemplate};
use flowtune_lm::tokenizer::{ChatMessage, Tokenizer};
use loader_support::{read_json, run_reference, test_model};
use serde_json::{json, Value};

const LLAMA3: &str = "{% set loop_messages = messages %}{% for message in loop_messages %}{% set content = '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n'+ message['content'] | trim + '<|eot_id|>' %}{% if loop.index0 == 0 %}{% set content = bos_token + content %}{% endif %}{{ content }}{% endfor %}{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}";

const MISTRAL: &str = "{{ bos_token }}{% for message in messages %}{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}{% if message['role'] == 'user' %}{{ '[INST] ' + message['content'] + ' [/INST]' }}{% elif message['role'] == 'assistant' %}{{ message['content'] + eos_token}}{% else %}{{ raise_exception('Only user and assistant roles are supported!') }}{% endif %}{% endfor %}";

const QWEN2_WS: &str = "{% for message in messages %}
    {% if loop.first and messages[0]['role'] != 'system' %}
    {{- '<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n' }}
    {% endif %}
{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}
{% endfor %}
{% if add_generation_prompt %}
{{ '<|im_start|>assistant\n' }}
{% endif %}
";

const PHI3: &str = "{% for message in messages %}{% if message['role'] == 'system' %}{{'<|system|>\n' + message['content'] + '<|end|>\n'}}{% elif message['role'] == 'user' %}{{'<|user|>\n' + message['content'] + '<|end|>\n'}}{% elif message['role'] == 'assistant' %}{{'<|assistant|>\n' + message['content'] + '<|end|>\n'}}{% endif %}{% endfor %}{% if add_generation_prompt %}{{ '<|assistant|>\n' }}{% else %}{{ eos_token }}{% endif %}";

const STRESS: &str = "{%- set ns = namespace(n=0, seen_system=false) -%}
{%- for m in messages -%}
  {%- if m.role == 'assistant' and ns.n > 4 %}{% break %}{% endif -%}
  {%- if m.role == 'system' %}{% set ns.seen_system = true %}{% continue %}{% endif -%}
  {%- set ns.n = ns.n + 1 %}
[{{ loop.index }}/{{ loop.length }}|{{ m.role | upper }}|{{ m.content.strip().split('\n')[0][:40] }}|{{ m.content | length }}|{{ m.content.startswith('Q') }}|{{ m.content.replace('a', 'A')[:20] }}|{{ m.content.lower()[-10:] }}|{{ m | tojson }}]
{%- endfor %}
{{ ns.n }} {{ ns.seen_system }} {{ none }} {{ messages | length }} {{ [1, 2] | tojson }} {{ {'k': 'v\"', 'n': 1.5} | tojson(indent=2) }}
{%- if add_generation_prompt %}<gen>{{ eos_token }}{% endif %}";

fn conversations() -> Vec<Vec<ChatMessage>> {
    let doc: String = (0..60)
        .map(|i| {
            format!(
                "Sentence {i} of the document talks about river {i} and its {} bridges. ",
                i % 7
            )
        })
        .collect();
    vec![
        vec![ChatMessage::new("user", "Hi!")],
        vec![ChatMessage::new("user", format!("Summarise this document:\n\n{doc}\n\nBe brief."))],
        vec![ChatMessage::new("user", "Qu'est-ce que la «tour Eiffel» ? 東京タワーとの違いは？ 🗼 Ärger, naïve")],
        vec![
            ChatMessage::new(
                "system",
                "You answer multi-hop questions. Reply with the shortest answer span, nothing else.",
            ),
            ChatMessage::new(
                "user",
                "Question: Who founded the company that makes the iPhone?\n\nParagraph 1: Apple Inc. designs the iPhone.\n\nParagraph 2: Apple was founded by Steve Jobs, Steve Wozniak and Ronald Wayne.",
            ),
        ],
        vec![
            ChatMessage::new("user", "What is 2+2?"),
            ChatMessage::new("assistant", "4"),
            ChatMessage::new("user", "And times 3?"),
            ChatMessage::new("assistant", "12"),
            ChatMessage::new("user", "Quote it: \"twelve\" \\ done"),
        ],
        vec![
            ChatMessage::new("system", "  Be terse.\n"),
            ChatMessage::new("user", "  padded question  \n"),
            ChatMessage::new("assistant", "\tanswer\t"),
            ChatMessage::new("user", "Q again"),
        ],
    ]
}

#[test]
fn chat_templates_render_like_transformers() {
    let model = test_model();
    let file = GgufFile::open(&model).expect("open");
    let tok = Tokenizer::from_gguf(&file.header, &model).expect("tokenizer");
    let mut convs = conversations();
    let base = convs.len();
    let merged: Vec<(usize, Vec<ChatMessage>)> = convs
        .iter()
        .enumerate()
        .filter_map(|(i, c)| merge_system(c).map(|m| (i, m)))
        .collect();
    convs.extend(merged.iter().map(|(_, m)| m.clone()));
    let templates = [
        ("gguf", None),
        ("llama3", Some(LLAMA3)),
        ("mistral", Some(MISTRAL)),
        ("qwen2_ws", Some(QWEN2_WS)),
        ("phi3", Some(PHI3)),
        ("stress", Some(STRESS)),
    ];
    let dir = tempfile::tempdir().expect("tempdir");
    let inp = dir.path().join("in.json");
    let out = dir.path().join("out.json");
    // Written by hand so each message keeps its field order (role, content), which
    // `tojson` and `items()` expose; a serde_json::Value would sort the keys.
    let spec = format!(
        "{{\"conversations\": {}, \"templates\": {}}}",
        serde_json::to_string(&convs).expect("json"),
        json!(templates
            .iter()
            .map(|(n, t)| (n.to_string(), json!(t)))
            .collect::<serde_json::Map<_, _>>()),
    );
    std::fs::write(&inp, spec).expect("write");
    run_reference(&[
        "template".as_ref(),
        model.as_os_str(),
        inp.as_os_str(),
        out.as_os_str(),
    ]);
    let reference = read_json(&out);

    let specials: Vec<(String, String)> = {
        let s = tok.special_tokens();
        [
            ("bos_token", &s.bos_token),
            ("eos_token", &s.eos_token),
            ("unk_token", &s.unk_token),
            ("pad_token", &s.pad_token),
        ]
        .into_iter()
        .filter_map(|(k, v)| v.clone().map(|v| (k.to_string(), v)))
        .collect()
    };
    let mut compared = 0;
    let mut merged_checked = 0;
    for (name, source) in templates {
        let rendered_by = |conv: &[ChatMessage], gen: bool| -> flowtune_lm::Result<String> {
            match source {
                None => tok.apply_chat_template(conv, gen),
                Some(src) => ChatTemplate::new(src, std::path::Path::new(name), specials.clone())?
                    .render(conv, gen),
            }
        };
        for (ci, conv) in convs.iter().enumerate().take(base) {
            for (gi, gen) in [false, true].into_iter().enumerate() {
                let theirs = &reference[name][ci][gi];
                let ours = rendered_by(conv, gen);
                match theirs {
                    Value::String(s) => {
                        let ours =
                            ours.unwrap_or_else(|e| panic!("{name} conv {ci} gen {gen}: {e}"));
                        assert_eq!(
                            &ours, s,
                            "template {name}, conversation {ci}, add_generation_prompt={gen}"
                        );
                        compared += 1;
                    }
                    _ => {
                        // Jinja2 raised. With a system message we merge and retry.
                        match merged.iter().position(|(i, _)| *i == ci) {
                            Some(k) => {
                                let again = &reference[name][base + k][gi];
                                let s = again.as_str().unwrap_or_else(|| {
                                    panic!("{name}: merged conversation {ci} also raises in Jinja2: {again}")
                                });
                                let ours = ours.unwrap_or_else(|e| panic!("{name} conv {ci}: {e}"));
                                assert_eq!(
                                    &ours, s,
                                    "template {name}, merged conversation {ci}, gen={gen}"
                                );
                                merged_checked += 1;
                            }
                            None => assert!(
                                ours.is_err(),
                                "{name} conv {ci}: Jinja2 raised ({theirs}) but we rendered"
                            ),
                        }
                    }
                }
            }
        }
    }
    eprintln!(
        "{compared} renderings identical, {merged_checked} system-merged renderings identical"
    );
    assert!(
        compared >= 50 && merged_checked >= 4,
        "{compared} / {merged_checked}"
    );
}
