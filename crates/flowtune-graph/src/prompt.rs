//! Prompt templates: minijinja files under `prompts/<flow>/<node>.j2` (or `.md`) rendering to
//! chat messages.
//!
//! A rendered template is split into messages at lines that consist only of a role marker:
//! `[[system]]`, `[[user]]` or `[[assistant]]`. Text without any marker is one user message.
//! Each message's content is trimmed. Undefined variables are errors.
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use minijinja::{Environment, UndefinedBehavior};
use serde::Serialize;

use crate::backend::Message;
use crate::error::{Error, Result};

/// The prompt templates of one flow.
#[derive(Debug)]
pub struct PromptSet {
    dir: PathBuf,
    env: Environment<'static>,
    files: BTreeMap<String, PathBuf>,
}

fn template_error(file: &Path, err: &minijinja::Error) -> Error {
    let mut message = err.to_string();
    let mut source = std::error::Error::source(err);
    while let Some(s) = source {
        message.push_str(": ");
        message.push_str(&s.to_string());
        source = s.source();
    }
    Error::Template {
        file: file.to_owned(),
        line: err.line(),
        message,
    }
}

const ROLES: [&str; 3] = ["system", "user", "assistant"];

impl PromptSet {
    /// Loads every `*.j2` and `*.md` file of `dir` (template name: the file stem), compiling each.
    pub fn load_dir(dir: impl AsRef<Path>) -> Result<Self> {
        let dir = dir.as_ref().to_owned();
        let io = |source| Error::Io {
            path: dir.clone(),
            source,
        };
        let mut entries: Vec<PathBuf> = std::fs::read_dir(&dir)
            .map_err(io)?
            .map(|e| e.map(|e| e.path()))
            .collect::<std::result::Result<_, _>>()
            .map_err(io)?;
        entries.sort();
        let mut env = Environment::new();
        env.set_undefined_behavior(UndefinedBehavior::Strict);
        env.set_keep_trailing_newline(true);
        let mut files: BTreeMap<String, PathBuf> = BTreeMap::new();
        for path in entries {
            let ext = path.extension().and_then(|e| e.to_str()).unwrap_or("");
            if !matches!(ext, "j2" | "md") || !path.is_file() {
                continue;
            }
            let Some(name) = path.file_stem().and_then(|s| s.to_str()).map(str::to_owned) else {
                continue;
            };
            let source = std::fs::read_to_string(&path).map_err(|source| Error::Io {
                path: path.clone(),
                source,
            })?;
            if let Some(previous) = files.get(&name) {
                return Err(Error::Template {
                    file: path.clone(),
                    line: None,
                    message: format!(
                        "template `{name}` is also defined by {}",
                        previous.display()
                    ),
                });
            }
            env.add_template_owned(name.clone(), source)
                .map_err(|e| template_error(&path, &e))?;
            files.insert(name, path);
        }
        Ok(PromptSet { dir, env, files })
    }

    /// Loads `<root>/prompts/<flow>/`.
    pub fn load_flow(root: impl AsRef<Path>, flow: &str) -> Result<Self> {
        Self::load_dir(root.as_ref().join("prompts").join(flow))
    }

    /// Template names, sorted.
    pub fn names(&self) -> impl Iterator<Item = &str> {
        self.files.keys().map(String::as_str)
    }

    /// Renders template `name` with `vars` and splits it into messages.
    pub fn render(&self, name: &str, vars: impl Serialize) -> Result<Vec<Message>> {
        let file = self.files.get(name).ok_or_else(|| Error::MissingTemplate {
            name: name.to_owned(),
            dir: self.dir.clone(),
        })?;
        let template = self
            .env
            .get_template(name)
            .map_err(|e| template_error(file, &e))?;
        let text = template
            .render(vars)
            .map_err(|e| template_error(file, &e))?;
        split_messages(&text).map_err(|message| Error::Template {
            file: file.clone(),
            line: None,
            message,
        })
    }
}

/// Splits rendered text into messages at `[[role]]` marker lines.
pub fn split_messages(text: &str) -> std::result::Result<Vec<Message>, String> {
    let mut messages: Vec<Message> = Vec::new();
    let mut preamble = String::new();
    let mut current: Option<(String, String)> = None;
    for line in text.split_inclusive('\n') {
        let marker = line
            .trim()
            .strip_prefix("[[")
            .and_then(|l| l.strip_suffix("]]"))
            .filter(|role| ROLES.contains(role));
        match (marker, &mut current) {
            (Some(role), _) => {
                if let Some((r, c)) = current.take() {
                    messages.push(Message::new(&r, c.trim()));
                }
                current = Some((role.to_owned(), String::new()));
            }
            (None, Some((_, content))) => content.push_str(line),
            (None, None) => preamble.push_str(line),
        }
    }
    if let Some((r, c)) = current.take() {
        messages.push(Message::new(&r, c.trim()));
    }
    if messages.is_empty() {
        return Ok(vec![Message::user(preamble.trim())]);
    }
    if !preamble.trim().is_empty() {
        return Err(format!(
            "rendered text before the first role marker: {:?}",
            preamble.trim().chars().take(60).collect::<String>()
        ));
    }
    Ok(messages)
}
