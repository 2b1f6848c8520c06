//! A small regular-expression matcher for PEFT's string `target_modules` (Python `re.fullmatch`
//! against the module path). Supported: literals, `.`, escapes (`\.`, `\d`, `\w`, `\s`, ...),
//! classes `[a-z_]` / `[^...]`, groups `(...)` / `(?:...)`, `|`, `*`, `+`, `?`, `{n}`, `{n,}`,
//! `{n,m}`, `^`, `$`. Anything else (lookarounds, backreferences, flags) is rejected.

/// One character predicate.
#[derive(Clone, Debug)]
enum CharSet {
    Any,
    Lit(char),
    Digit(bool),
    Word(bool),
    Space(bool),
    Class {
        negated: bool,
        items: Vec<ClassItem>,
    },
}

#[derive(Clone, Debug)]
enum ClassItem {
    Range(char, char),
    Set(CharSet),
}

impl CharSet {
    fn matches(&self, c: char) -> bool {
        match self {
            CharSet::Any => c != '\n',
            CharSet::Lit(l) => *l == c,
            CharSet::Digit(pos) => c.is_ascii_digit() == *pos,
            CharSet::Word(pos) => (c.is_alphanumeric() || c == '_') == *pos,
            CharSet::Space(pos) => c.is_whitespace() == *pos,
            CharSet::Class { negated, items } => {
                let hit = items.iter().any(|it| match it {
                    ClassItem::Range(a, b) => *a <= c && c <= *b,
                    ClassItem::Set(s) => s.matches(c),
                });
                hit != *negated
            }
        }
    }
}

#[derive(Clone, Debug)]
enum Node {
    Char(CharSet),
    Concat(Vec<Node>),
    Alt(Vec<Node>),
    Repeat(Box<Node>, usize, Option<usize>),
    Start,
    End,
}

/// A compiled pattern.
#[derive(Clone, Debug)]
pub(crate) struct Pattern {
    root: Node,
}

struct Parser<'a> {
    chars: Vec<char>,
    pos: usize,
    src: &'a str,
}

type ParseResult<T> = std::result::Result<T, String>;

impl Parser<'_> {
    fn peek(&self) -> Option<char> {
        self.chars.get(self.pos).copied()
    }
    fn next(&mut self) -> Option<char> {
        let c = self.peek();
        self.pos += 1;
        c
    }
    fn err<T>(&self, what: &str) -> ParseResult<T> {
        Err(format!("{what} at offset {} of `{}`", self.pos, self.src))
    }

    fn alt(&mut self) -> ParseResult<Node> {
        let mut options = vec![self.concat()?];
        while self.peek() == Some('|') {
            self.pos += 1;
            options.push(self.concat()?);
        }
        Ok(if options.len() == 1 {
            options.remove(0)
        } else {
            Node::Alt(options)
        })
    }

    fn concat(&mut self) -> ParseResult<Node> {
        let mut items = vec![];
        while let Some(c) = self.peek() {
            if c == '|' || c == ')' {
                break;
            }
            let atom = self.atom()?;
            items.push(self.quantified(atom)?);
        }
        Ok(Node::Concat(items))
    }

    fn number(&mut self) -> Option<usize> {
        let start = self.pos;
        while self.peek().is_some_and(|c| c.is_ascii_digit()) {
            self.pos += 1;
        }
        self.chars[start..self.pos]
            .iter()
            .collect::<String>()
            .parse()
            .ok()
    }

    fn quantified(&mut self, atom: Node) -> ParseResult<Node> {
        let (min, max) = match self.peek() {
            Some('*') => (0, None),
            Some('+') => (1, None),
            Some('?') => (0, Some(1)),
            Some('{') => {
                self.pos += 1;
                let Some(min) = self.number() else {
                    return self.err("expected a number after `{`");
                };
                let max = if self.peek() == Some(',') {
                    self.pos += 1;
                    self.number()
                } else {
                    Some(min)
                };
                if self.peek() != Some('}') {
                    return self.err("expected `}`");
                }
                (min, max)
            }
            _ => return Ok(atom),
        };
        self.pos += 1;
        if matches!(self.peek(), Some('?') | Some('+')) {
            // Lazy/possessive variants match the same strings under fullmatch.
            self.pos += 1;
        }
        Ok(Node::Repeat(Box::new(atom), min, max))
    }

    fn escape(&mut self) -> ParseResult<CharSet> {
        match self.next() {
            Some('d') => Ok(CharSet::Digit(true)),
            Some('D') => Ok(CharSet::Digit(false)),
            Some('w') => Ok(CharSet::Word(true)),
            Some('W') => Ok(CharSet::Word(false)),
            Some('s') => Ok(CharSet::Space(true)),
            Some('S') => Ok(CharSet::Space(false)),
            Some('n') => Ok(CharSet::Lit('\n')),
            Some('t') => Ok(CharSet::Lit('\t')),
            Some(c) if !c.is_alphanumeric() => Ok(CharSet::Lit(c)),
            _ => self.err("unsupported escape"),
        }
    }

    fn atom(&mut self) -> ParseResult<Node> {
        match self.next() {
            Some('.') => Ok(Node::Char(CharSet::Any)),
            Some('^') => Ok(Node::Start),
            Some('$') => Ok(Node::End),
            Some('\\') => Ok(Node::Char(self.escape()?)),
            Some('(') => {
                if self.peek() == Some('?') {
                    self.pos += 1;
                    if self.next() != Some(':') {
                        return self.err("only `(?:` groups are supported");
                    }
                }
                let inner = self.alt()?;
                if self.next() != Some(')') {
                    return self.err("expected `)`");
                }
                Ok(inner)
            }
            Some('[') => self.class(),
            Some(c) if "*+?{".contains(c) => self.err("quantifier without an operand"),
            Some(')') => self.err("unbalanced `)`"),
            Some(c) => Ok(Node::Char(CharSet::Lit(c))),
            None => self.err("unexpected end"),
        }
    }

    fn class(&mut self) -> ParseResult<Node> {
        let negated = self.peek() == Some('^');
        if negated {
            self.pos += 1;
        }
        let mut items = vec![];
        let mut first = true;
        loop {
            let c = match self.next() {
                None => return self.err("unterminated `[`"),
                Some(']') if !first => break,
                Some(c) => c,
            };
            first = false;
            let lo = if c == '\\' {
                match self.escape()? {
                    CharSet::Lit(l) => l,
                    set => {
                        items.push(ClassItem::Set(set));
                        continue;
                    }
                }
            } else {
                c
            };
            if self.peek() == Some('-') && self.chars.get(self.pos + 1).is_some_and(|&n| n != ']') {
                self.pos += 1;
                let hi = match self.next() {
                    Some('\\') => match self.escape()? {
                        CharSet::Lit(l) => l,
                        _ => return self.err("bad class range"),
                    },
                    Some(h) => h,
                    None => return self.err("unterminated `[`"),
                };
                items.push(ClassItem::Range(lo, hi));
            } else {
                items.push(ClassItem::Range(lo, lo));
            }
        }
        Ok(Node::Char(CharSet::Class { negated, items }))
    }
}

impl Pattern {
    /// Compiles `src`; the error says what is unsupported and where.
    pub(crate) fn new(src: &str) -> std::result::Result<Pattern, String> {
        let mut p = Parser {
            chars: src.chars().collect(),
            pos: 0,
            src,
        };
        let root = p.alt()?;
        if p.pos < p.chars.len() {
            return p.err("unbalanced `)`");
        }
        Ok(Pattern { root })
    }

    /// Whether the whole of `text` matches (Python `re.fullmatch`).
    pub(crate) fn full_match(&self, text: &str) -> bool {
        let chars: Vec<char> = text.chars().collect();
        let n = chars.len();
        matches(&self.root, &chars, 0, &mut |end| end == n)
    }
}

/// Backtracking match of `node` at `i`, calling `k` with every end position until it accepts.
fn matches(node: &Node, s: &[char], i: usize, k: &mut dyn FnMut(usize) -> bool) -> bool {
    match node {
        Node::Char(set) => i < s.len() && set.matches(s[i]) && k(i + 1),
        Node::Start => i == 0 && k(i),
        Node::End => i == s.len() && k(i),
        Node::Alt(options) => options.iter().any(|o| matches(o, s, i, k)),
        Node::Concat(items) => concat(items, s, i, k),
        Node::Repeat(inner, min, max) => repeat(inner, *min, *max, 0, s, i, k),
    }
}

fn concat(items: &[Node], s: &[char], i: usize, k: &mut dyn FnMut(usize) -> bool) -> bool {
    match items.split_first() {
        None => k(i),
        Some((first, rest)) => matches(first, s, i, &mut |j| concat(rest, s, j, k)),
    }
}

fn repeat(
    inner: &Node,
    min: usize,
    max: Option<usize>,
    count: usize,
    s: &[char],
    i: usize,
    k: &mut dyn FnMut(usize) -> bool,
) -> bool {
    let more_allowed = max.is_none_or(|m| count < m);
    // Greedy: try one more repetition (that consumes input), then stop.
    if more_allowed
        && matches(inner, s, i, &mut |j| {
            (j > i || count < min) && repeat(inner, min, max, count + 1, s, j, k)
        })
    {
        return true;
    }
    count >= min && k(i)
}
