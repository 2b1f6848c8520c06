//! The tokenizer rebuilt from the test model's GGUF metadata gives the same ids as
//! the tokenizer transformers builds from the same file (`lm_load_ref.py tokenize`),
//! on a multilingual set of strings and on rendered chat prompts; decoding
//! round-trips like transformers'. Exact comparison (ids are integers).
#![allow(clippy::unwrap_used, clippy::expect_used)]
mod loader_support;

use flowtune_lm::gguf::GgufFile;
use flowtune_lm::loader::{load_gguf, LoadOptions};
use flowtune_lm::tokenizer::{ChatMessage, Tokenizer};
use loader_support::{read_json, run_reference, test_model};

/// Strings covering scripts, whitespace shapes, digits, code, emoji and inline
/// special tokens.
pub fn multilingual_strings() -> Vec<String> {
    let mut v: Vec<String> = [
        "Hello world",
        " leading space and trailing space ",
        "Multiple   spaces\tand\ttabs\n\nand blank lines\r\nCRLF",
        "Numbers: 1 12 123 1234 12345 3.14159 -42 1e10 2024-06-01",
        "Français : « l’été où j’ai vu la tour Eiffel » — naïve façade, cœur.",
        "Deutsch: Straße, Größe, Übermäßig, Fußgängerübergänge.",
        "Español: ¿Dónde está la biblioteca? ¡Olé! año, niño.",
        "Русский: Съешь же ещё этих мягких французских булок, да выпей чаю.",
        "Ελληνικά: Ξεσκεπάζω την ψυχοφθόρα βδελυγμία.",
        "中文：我能吞下玻璃而不伤身体。北京是中国的首都。",
        "日本語：私はガラスを食べられます。それは私を傷つけません。東京タワー",
        "한국어: 나는 유리를 먹을 수 있어요. 그래도 아프지 않아요.",
        "العربية: أنا قادر على أكل الزجاج و هذا لا يؤلمني.",
        "हिन्दी: मैं काँच खा सकता हूँ और मुझे उससे कोई चोट नहीं पहुंचती.",
        "ไทย: ฉันกินกระจกได้ แต่มันไม่ทำให้ฉันเจ็บ",
        "Emoji: 🗼🇫🇷👩‍👩‍👧‍👦 ❤️ 👍🏽 and ZWJ\u{200d}sequences, combining e\u{301} vs é",
        "Code: fn main() { println!(\"{}\", x.map(|y| y * 2)); } // comment\n\tif (a && b) { return; }",
        "Contractions: don't, I'm, they're, we've, she'll, he'd, it's. DON'T SHOUT'S",
        "URL https://example.com/path?q=1&r=two#frag and email a.b@c.de",
        "<|im_start|>user\nInline special tokens<|im_end|>\n<|im_start|>assistant\n",
        "<|endoftext|><repo_name>x<file_sep>",
        "",
        " ",
        "\n",
        "a",
        "Ⅻ ℃ ½ ² ﬁ ﹏ 𝔘𝔫𝔦𝔠𝔬𝔡𝔢",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    v.push("The quick brown fox jumps over the lazy dog. ".repeat(40));
    v
}

/// Chat prompts (rendered by our template code) to tokenise too.
fn chat_prompts(tok: &Tokenizer) -> Vec<String> {
    let convs = [
        vec![ChatMessage::new("user", "Hi!")],
        vec![
            ChatMessage::new("system", "Answer with Yes or No."),
            ChatMessage::new(
                "user",
                "Question: Is Paris in France?\nParagraph: Paris is the capital of France.",
            ),
        ],
        vec![
            ChatMessage::new("user", "Wie heißt du?"),
            ChatMessage::new("assistant", "Ich heiße SmolLM."),
            ChatMessage::new("user", "日本語は話せますか？"),
        ],
    ];
    convs
        .iter()
        .map(|c| tok.apply_chat_template(c, true).expect("render"))
        .collect()
}

#[test]
fn gguf_tokenizer_ids_match_transformers() {
    let model = test_model();
    let file = GgufFile::open(&model).expect("open");
    let tok = Tokenizer::from_gguf(&file.header, &model).expect("tokenizer from GGUF");
    let mut texts = multilingual_strings();
    texts.extend(chat_prompts(&tok));
    let dir = tempfile::tempdir().expect("tempdir");
    let inp = dir.path().join("in.json");
    let out = dir.path().join("out.json");
    std::fs::write(&inp, serde_json::to_string(&texts).expect("json")).expect("write");
    run_reference(&[
        "tokenize".as_ref(),
        model.as_os_str(),
        inp.as_os_str(),
        out.as_os_str(),
    ]);
    let reference = read_json(&out);
    let mut total = 0;
    for (i, text) in texts.iter().enumerate() {
        let ours = tok.encode(text).expect("encode");
        let theirs: Vec<u32> = serde_json::from_value(reference["ids"][i].clone()).expect("ids");
        assert_eq!(ours, theirs, "ids differ for string {i}: {text:?}");
        let decoded = tok.decode(&ours, false).expect("decode");
        assert_eq!(
            decoded,
            reference["decoded"][i].as_str().expect("decoded"),
            "decode differs for string {i}"
        );
        total += ours.len();
    }
    eprintln!("{} strings, {total} tokens identical", texts.len());
    // The same ids through the full loader, and encode_chat == encode(render).
    let loaded = load_gguf(&model, &LoadOptions::default()).expect("load");
    let conv = [ChatMessage::new("user", "Hi!")];
    assert_eq!(
        loaded
            .tokenizer
            .encode_chat(&conv, true)
            .expect("encode_chat"),
        loaded
            .tokenizer
            .encode(
                &loaded
                    .tokenizer
                    .apply_chat_template(&conv, true)
                    .expect("render")
            )
            .expect("encode")
    );
    assert_eq!(loaded.tokenizer.token_to_id("<|im_end|>"), Some(2));
    assert_eq!(loaded.tokenizer.eos_token_ids(), &[2]);
    assert_eq!(loaded.tokenizer.vocab_size(), 49152);
}
