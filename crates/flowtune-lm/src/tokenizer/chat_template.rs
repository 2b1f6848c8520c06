//! HF chat templates rendered with minijinja the way transformers'
//! `apply_chat_template(..., tokenize=False)` renders them with Jinja2: the same
//! environment settings (`trim_blocks`, `lstrip_blocks`, loop controls), the same
//! globals (`raise_exception`, `strftime_now`), a `tojson` that behaves like
//! Python's `json.dumps` (no HTML escaping, `", "`/`": "` separators), and Python
//! string methods through minijinja-contrib's pycompat.
use std::path::{Path, PathBuf};

use minijinja::value::{Kwargs, Value, ValueKind};
use minijinja::{Environment, ErrorKind};

use super::ChatMessage;
use crate::{Error, Result};

/// Marker put in front of messages raised by a template's `raise_exception`.
const RAISED: &str = "template raised: ";

/// A compiled chat template plus the special tokens it may reference.
pub struct ChatTemplate {
    env: Environment<'static>,
    source: String,
    path: PathBuf,
    /// Special tokens exposed to the template (`bos_token`, `eos_token`, ...).
    specials: Vec<(String, String)>,
}

impl std::fmt::Debug for ChatTemplate {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ChatTemplate")
            .field("path", &self.path)
            .field("len", &self.source.len())
            .finish()
    }
}

fn template_error(path: &Path, e: &minijinja::Error) -> Error {
    let mut reason = match e.kind() {
        ErrorKind::InvalidOperation if e.detail().is_some_and(|d| d.starts_with(RAISED)) => {
            e.detail().unwrap_or_default().to_string()
        }
        _ => e.to_string(),
    };
    if let Some(line) = e.line() {
        if !reason.contains("line") {
            reason.push_str(&format!(" (template line {line})"));
        }
    }
    Error::ChatTemplate {
        path: path.to_path_buf(),
        reason,
    }
}

/// Python's `json.dumps(x, ensure_ascii=False, indent=indent)` of a template value.
fn py_json(
    v: &Value,
    indent: Option<usize>,
    level: usize,
    out: &mut String,
) -> std::result::Result<(), minijinja::Error> {
    let (item_sep, nl) = match indent {
        Some(_) => (",", true),
        None => (", ", false),
    };
    let newline = |out: &mut String, lvl: usize| {
        if let Some(n) = indent {
            out.push('\n');
            out.push_str(&" ".repeat(n * lvl));
        }
    };
    match v.kind() {
        ValueKind::Undefined | ValueKind::None => out.push_str("null"),
        ValueKind::Bool => out.push_str(if v.is_true() { "true" } else { "false" }),
        ValueKind::Number => {
            if let Some(i) = v.as_i64() {
                out.push_str(&i.to_string());
            } else {
                let f: f64 = f64::try_from(v.clone()).unwrap_or(f64::NAN);
                // Python repr of floats: shortest round-trip, always with a '.' or exponent.
                let s = format!("{f:?}");
                out.push_str(&s);
            }
        }
        ValueKind::String => {
            out.push('"');
            for ch in v.as_str().unwrap_or_default().chars() {
                match ch {
                    '"' => out.push_str("\\\""),
                    '\\' => out.push_str("\\\\"),
                    '\n' => out.push_str("\\n"),
                    '\r' => out.push_str("\\r"),
                    '\t' => out.push_str("\\t"),
                    '\u{8}' => out.push_str("\\b"),
                    '\u{c}' => out.push_str("\\f"),
                    c if (c as u32) < 0x20 => out.push_str(&format!("\\u{:04x}", c as u32)),
                    c => out.push(c),
                }
            }
            out.push('"');
        }
        ValueKind::Seq | ValueKind::Iterable => {
            let items: Vec<Value> = v.try_iter()?.collect();
            if items.is_empty() {
                out.push_str("[]");
                return Ok(());
            }
            out.push('[');
            for (i, x) in items.iter().enumerate() {
                if i > 0 {
                    out.push_str(item_sep);
                }
                if nl {
                    newline(out, level + 1);
                }
                py_json(x, indent, level + 1, out)?;
            }
            if nl {
                newline(out, level);
            }
            out.push(']');
        }
        ValueKind::Map => {
            let keys: Vec<Value> = v.try_iter()?.collect();
            if keys.is_empty() {
                out.push_str("{}");
                return Ok(());
            }
            out.push('{');
            for (i, k) in keys.iter().enumerate() {
                if i > 0 {
                    out.push_str(item_sep);
                }
                if nl {
                    newline(out, level + 1);
                }
                let key = match k.as_str() {
                    Some(s) => Value::from(s),
                    None => Value::from(k.to_string()),
                };
                py_json(&key, indent, level + 1, out)?;
                out.push_str(": ");
                py_json(&v.get_item(k)?, indent, level + 1, out)?;
            }
            if nl {
                newline(out, level);
            }
            out.push('}');
        }
        _ => {
            return Err(minijinja::Error::new(
                ErrorKind::InvalidOperation,
                format!("tojson: cannot serialise a {} value", v.kind()),
            ))
        }
    }
    Ok(())
}

fn tojson(v: Value, kwargs: Kwargs) -> std::result::Result<Value, minijinja::Error> {
    let indent: Option<usize> = kwargs.get("indent")?;
    // Accepted for compatibility; transformers' defaults are what we implement.
    let _: Option<bool> = kwargs.get("ensure_ascii")?;
    let _: Option<bool> = kwargs.get("sort_keys")?;
    kwargs.assert_all_used()?;
    let mut out = String::new();
    py_json(&v, indent, 0, &mut out)?;
    Ok(Value::from_safe_string(out))
}

fn raise_exception(message: String) -> std::result::Result<Value, minijinja::Error> {
    Err(minijinja::Error::new(
        ErrorKind::InvalidOperation,
        format!("{RAISED}{message}"),
    ))
}

/// Days since 1970-01-01 to (year, month, day) in the proleptic Gregorian calendar.
fn civil_from_days(z: i64) -> (i64, u32, u32) {
    let z = z + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let m = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    let y = yoe + era * 400 + i64::from(m <= 2);
    (y, m, d)
}

/// Python's `datetime.now().strftime(fmt)` for the common directives (UTC clock).
fn strftime_now(fmt: String) -> std::result::Result<Value, minijinja::Error> {
    const MONTHS: [&str; 12] = [
        "January",
        "February",
        "March",
        "April",
        "May",
        "June",
        "July",
        "August",
        "September",
        "October",
        "November",
        "December",
    ];
    const DAYS: [&str; 7] = [
        "Monday",
        "Tuesday",
        "Wednesday",
        "Thursday",
        "Friday",
        "Saturday",
        "Sunday",
    ];
    let secs = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or(0);
    let days = secs.div_euclid(86_400);
    let sod = secs.rem_euclid(86_400);
    let (y, m, d) = civil_from_days(days);
    let weekday = (days + 3).rem_euclid(7) as usize; // 1970-01-01 was a Thursday
    let (mi, di) = ((m - 1) as usize, d);
    let mut out = String::new();
    let mut chars = fmt.chars();
    while let Some(c) = chars.next() {
        if c != '%' {
            out.push(c);
            continue;
        }
        match chars.next() {
            Some('Y') => out.push_str(&y.to_string()),
            Some('y') => out.push_str(&format!("{:02}", y.rem_euclid(100))),
            Some('m') => out.push_str(&format!("{m:02}")),
            Some('d') => out.push_str(&format!("{di:02}")),
            Some('e') => out.push_str(&format!("{di:>2}")),
            Some('B') => out.push_str(MONTHS[mi]),
            Some('b') => out.push_str(&MONTHS[mi][..3]),
            Some('A') => out.push_str(DAYS[weekday]),
            Some('a') => out.push_str(&DAYS[weekday][..3]),
            Some('H') => out.push_str(&format!("{:02}", sod / 3600)),
            Some('M') => out.push_str(&format!("{:02}", sod / 60 % 60)),
            Some('S') => out.push_str(&format!("{:02}", sod % 60)),
            Some('%') => out.push('%'),
            Some(other) => {
                return Err(minijinja::Error::new(
                    ErrorKind::InvalidOperation,
                    format!("strftime_now: unsupported directive %{other}"),
                ))
            }
            None => out.push('%'),
        }
    }
    Ok(Value::from(out))
}

impl ChatTemplate {
    /// Compile a template; `path` names its file in errors; `specials` are the
    /// special tokens it may reference by name (`bos_token`, `eos_token`, ...).
    pub fn new(source: &str, path: &Path, specials: Vec<(String, String)>) -> Result<Self> {
        let mut env = Environment::new();
        env.set_trim_blocks(true);
        env.set_lstrip_blocks(true);
        env.set_keep_trailing_newline(false);
        env.set_unknown_method_callback(minijinja_contrib::pycompat::unknown_method_callback);
        env.add_function("raise_exception", raise_exception);
        env.add_function("strftime_now", strftime_now);
        env.add_filter("tojson", tojson);
        // Print Python's spelling of booleans and None, as Jinja2 does.
        env.set_formatter(|out, state, value| match value.kind() {
            ValueKind::Bool => out
                .write_str(if value.is_true() { "True" } else { "False" })
                .map_err(Into::into),
            ValueKind::None => out.write_str("None").map_err(Into::into),
            _ => minijinja::escape_formatter(out, state, value),
        });
        env.add_template_owned("chat_template", source.to_string())
            .map_err(|e| template_error(path, &e))?;
        Ok(ChatTemplate {
            env,
            source: source.to_string(),
            path: path.to_path_buf(),
            specials,
        })
    }

    /// The template text.
    pub fn source(&self) -> &str {
        &self.source
    }

    fn render_once(
        &self,
        messages: &[ChatMessage],
        add_generation_prompt: bool,
    ) -> std::result::Result<String, minijinja::Error> {
        let tmpl = self.env.get_template("chat_template")?;
        let mut ctx: Vec<(String, Value)> = self
            .specials
            .iter()
            .map(|(k, v)| (k.clone(), Value::from(v.as_str())))
            .collect();
        ctx.push(("messages".into(), Value::from_serialize(messages)));
        ctx.push((
            "add_generation_prompt".into(),
            Value::from(add_generation_prompt),
        ));
        ctx.push(("tools".into(), Value::from(())));
        ctx.push(("documents".into(), Value::from(())));
        let ctx: Value = ctx.into_iter().collect();
        tmpl.render(ctx)
    }

    /// Render a conversation. When the template raises and the conversation starts
    /// with a system message, the system content is merged into the first user
    /// message (`"{system}\n\n{user}"`) and rendering is retried.
    pub fn render(&self, messages: &[ChatMessage], add_generation_prompt: bool) -> Result<String> {
        match self.render_once(messages, add_generation_prompt) {
            Ok(s) => Ok(s),
            Err(e) => {
                let raised = e.kind() == ErrorKind::InvalidOperation
                    && e.detail().is_some_and(|d| d.starts_with(RAISED));
                match (raised, merge_system(messages)) {
                    (true, Some(merged)) => self
                        .render_once(&merged, add_generation_prompt)
                        .map_err(|e2| template_error(&self.path, &e2)),
                    _ => Err(template_error(&self.path, &e)),
                }
            }
        }
    }
}

/// The conversation with its system message(s) folded into the first user message,
/// or `None` when there is no system message.
pub fn merge_system(messages: &[ChatMessage]) -> Option<Vec<ChatMessage>> {
    let system: Vec<&str> = messages
        .iter()
        .filter(|m| m.role == "system")
        .map(|m| m.content.as_str())
        .collect();
    if system.is_empty() {
        return None;
    }
    let sys = system.join("\n\n");
    let mut out: Vec<ChatMessage> = messages
        .iter()
        .filter(|m| m.role != "system")
        .cloned()
        .collect();
    match out.iter_mut().find(|m| m.role == "user") {
        Some(u) => u.content = format!("{sys}\n\n{}", u.content),
        None => out.insert(
            0,
            ChatMessage {
                role: "user".into(),
                content: sys,
            },
        ),
    }
    Some(out)
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn civil_dates() {
        assert_eq!(civil_from_days(0), (1970, 1, 1));
        assert_eq!(civil_from_days(19_723), (2024, 1, 1));
        assert_eq!(civil_from_days(11_016), (2000, 2, 29));
    }
}
