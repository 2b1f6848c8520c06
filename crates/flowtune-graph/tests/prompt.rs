//! Prompt loading: the shipped prompts/toy set renders, bad templates give file + line.
#![allow(clippy::expect_used, clippy::unwrap_used, clippy::panic)]

use std::path::PathBuf;

use flowtune_graph::{Error, Message, PromptSet};
use serde_json::json;

fn root() -> PathBuf {
    PathBuf::from(
        std::env::var("FLOWTUNE_ROOT")
            .expect("FLOWTUNE_ROOT is set by .cargo/config.toml; run through cargo"),
    )
}

#[test]
fn toy_prompts_render_to_messages() {
    let prompts = PromptSet::load_flow(root(), "toy").expect("prompts/toy loads");
    assert_eq!(prompts.names().collect::<Vec<_>>(), vec!["check", "plan"]);
    let msgs = prompts
        .render("plan", json!({"question": "Who?", "notes": ["a", "b"]}))
        .expect("renders");
    assert_eq!(
        msgs,
        vec![
            Message::system("You write one short search query for the question."),
            Message::user("Question: Who?\nNotes so far:\n- a\n- b\nQuery:"),
        ]
    );
}

#[test]
fn syntax_error_names_file_and_line() {
    let dir = tempfile::tempdir().expect("tempdir");
    std::fs::write(dir.path().join("good.j2"), "[[user]]\n{{ x }}\n").expect("write");
    std::fs::write(
        dir.path().join("bad.j2"),
        "[[user]]\nline two\n{% if x %}\nno endif\n",
    )
    .expect("write");
    let err = PromptSet::load_dir(dir.path()).expect_err("bad template");
    match err {
        Error::Template { file, line, .. } => {
            assert_eq!(file, dir.path().join("bad.j2"));
            assert!(matches!(line, Some(3) | Some(4)), "line {line:?}");
        }
        other => panic!("expected a template error, got {other}"),
    }
}

#[test]
fn undefined_variable_and_stray_text_are_errors() {
    let dir = tempfile::tempdir().expect("tempdir");
    std::fs::write(
        dir.path().join("a.md"),
        "[[system]]\nhi\n[[user]]\n\n{{ missing }}\n",
    )
    .expect("write");
    std::fs::write(dir.path().join("b.j2"), "stray\n[[user]]\nq\n").expect("write");
    std::fs::write(dir.path().join("plain.j2"), "just {{ x }}").expect("write");
    let prompts = PromptSet::load_dir(dir.path()).expect("loads");
    match prompts.render("a", json!({})) {
        Err(Error::Template { file, line, .. }) => {
            assert_eq!(file, dir.path().join("a.md"));
            assert_eq!(line, Some(5));
        }
        other => panic!("expected a template error, got {other:?}"),
    }
    assert!(matches!(
        prompts.render("b", json!({})),
        Err(Error::Template { .. })
    ));
    assert_eq!(
        prompts.render("plain", json!({"x": 1})).expect("renders"),
        vec![Message::user("just 1")]
    );
    assert!(matches!(
        prompts.render("nope", json!({})),
        Err(Error::MissingTemplate { .. })
    ));
}
