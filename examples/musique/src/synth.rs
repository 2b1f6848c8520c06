//! A synthetic MuSiQue-like data set: an invented, self-consistent world of entities and
//! single-hop facts, composed into 2–4-hop questions ("Who founded the company that produced
//! X?"), each hop's fact in its own short paragraph, distractor paragraphs drawn from the same
//! world, MuSiQue ids (`2hop__…`, `3hop1__…`, `4hop1__…`), decompositions with support
//! indices, answer aliases, and optional Full-style unanswerable twins (one supporting
//! paragraph swapped for a distractor). Seeded and deterministic; every record passes
//! [`crate::data`]'s validation. The answer always appears verbatim in the last hop's paragraph.
use std::collections::{BTreeSet, HashSet};

use rand::seq::{IndexedRandom, SliceRandom};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use serde::{Deserialize, Serialize};

use crate::data::{DecompositionStep, Paragraph, Record};
use crate::error::{Error, Result};

/// Settings of the generator (serde, so runs can record them).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SynthConfig {
    /// Seed of the world and the records.
    pub seed: u64,
    /// Number of answerable questions.
    pub questions: usize,
    /// Relative weights of 2-, 3- and 4-hop questions.
    pub hop_weights: [f64; 3],
    /// Paragraphs per record (supporting + distractors); at least 4 (the longest chain).
    pub paragraphs: usize,
    /// Add a Full-style unanswerable twin after each question (same id).
    pub unanswerable_twins: bool,
}

impl Default for SynthConfig {
    fn default() -> Self {
        SynthConfig {
            seed: 0,
            questions: 400,
            hop_weights: [0.5, 0.3, 0.2],
            paragraphs: 6,
            unanswerable_twins: false,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
enum Kind {
    Film,
    Album,
    Company,
    Person,
    City,
    Country,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
enum Relation {
    ProducedBy,
    Performer,
    FoundedBy,
    BornIn,
    Spouse,
    LocatedIn,
    Capital,
}

impl Relation {
    /// The MuSiQue-style decomposition label (`X >> produced by`).
    fn label(self) -> &'static str {
        match self {
            Relation::ProducedBy => "produced by",
            Relation::Performer => "performer",
            Relation::FoundedBy => "founded by",
            Relation::BornIn => "place of birth",
            Relation::Spouse => "spouse",
            Relation::LocatedIn => "country",
            Relation::Capital => "capital",
        }
    }
    /// A noun phrase for "the object of `x`".
    fn noun_phrase(self, x: &str) -> String {
        match self {
            Relation::ProducedBy => format!("the company that produced {x}"),
            Relation::Performer => format!("the singer of {x}"),
            Relation::FoundedBy => format!("the founder of {x}"),
            Relation::BornIn => format!("the birthplace of {x}"),
            Relation::Spouse => format!("the spouse of {x}"),
            Relation::LocatedIn => format!("the country where {x} is"),
            Relation::Capital => format!("the capital of {x}"),
        }
    }
    /// The question whose answer is the object of `x`.
    fn question(self, x: &str) -> String {
        match self {
            Relation::ProducedBy => format!("Which company produced {x}?"),
            Relation::Performer => format!("Who sang {x}?"),
            Relation::FoundedBy => format!("Who founded {x}?"),
            Relation::BornIn => format!("Where was {x} born?"),
            Relation::Spouse => format!("Who is the spouse of {x}?"),
            Relation::LocatedIn => format!("In which country is {x}?"),
            Relation::Capital => format!("What is the capital of {x}?"),
        }
    }
    /// The sentence stating the fact.
    fn sentence(self, s: &str, o: &str) -> String {
        match self {
            Relation::ProducedBy => format!("{s} is a film produced by {o}."),
            Relation::Performer => format!("{s} is an album by the singer {o}."),
            Relation::FoundedBy => format!("{s} is a company founded by {o}."),
            Relation::BornIn => format!("{s} was born in {o}."),
            Relation::Spouse => format!("{s} is married to {o}."),
            Relation::LocatedIn => format!("{s} is a city in {o}."),
            Relation::Capital => format!("The capital of {s} is {o}."),
        }
    }
}

/// A fact of the world: (subject, relation, object) as entity indices.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
struct Fact {
    subject: usize,
    relation: Relation,
    object: usize,
    /// Filler-sentence choice and year, fixed per fact so paragraphs are stable.
    filler: (usize, u32),
    /// The fact's single-hop id (as MuSiQue's decomposition ids).
    id: u64,
}

#[derive(Debug)]
struct World {
    names: Vec<String>,
    aliases: Vec<Vec<String>>,
    kinds: Vec<Kind>,
    facts: Vec<Fact>,
    /// facts_of[entity] = indices into `facts` with that subject.
    facts_of: Vec<Vec<usize>>,
}

const ONSETS: &[&str] = &[
    "b", "d", "f", "g", "k", "l", "m", "n", "p", "r", "s", "t", "v", "z", "br", "dr", "kr", "st",
    "th", "tr",
];
const VOWELS: &[&str] = &["a", "e", "i", "o", "u", "ai", "ou"];
const CODAS: &[&str] = &["", "", "n", "r", "l", "s", "th", "m"];
const NOUNS: &[&str] = &[
    "Orchard", "Harbor", "Lantern", "River", "Meadow", "Comet", "Garden", "Tower", "Mirror",
    "Winter", "Falcon", "Ember",
];
const ADJECTIVES: &[&str] = &[
    "Silver", "Quiet", "Golden", "Hidden", "Last", "Crimson", "Distant", "Broken", "Gentle",
    "Northern",
];
const COMPANY_SUFFIX: &[&str] = &["Pictures", "Studios", "Films", "Media"];

fn word(rng: &mut ChaCha8Rng, syllables: usize) -> String {
    let mut w = String::new();
    for _ in 0..syllables {
        w.push_str(ONSETS.choose(rng).unwrap_or(&"k"));
        w.push_str(VOWELS.choose(rng).unwrap_or(&"a"));
    }
    w.push_str(CODAS.choose(rng).unwrap_or(&""));
    let mut c = w.chars();
    match c.next() {
        Some(f) => f.to_uppercase().chain(c).collect(),
        None => w,
    }
}

/// A fresh name (and aliases) of `kind`, unique in `used`.
fn fresh_name(
    rng: &mut ChaCha8Rng,
    kind: Kind,
    used: &mut HashSet<String>,
) -> (String, Vec<String>) {
    loop {
        let (name, aliases) = match kind {
            Kind::Person => {
                let (first, last) = (word(rng, 2), word(rng, 2));
                (format!("{first} {last}"), vec![last])
            }
            Kind::City => (word(rng, 2), vec![]),
            Kind::Country => {
                let stem = word(rng, 2);
                (format!("{stem}ia"), vec![])
            }
            Kind::Company => {
                let stem = word(rng, 2);
                (
                    format!(
                        "{stem} {}",
                        COMPANY_SUFFIX.choose(rng).unwrap_or(&"Pictures")
                    ),
                    vec![stem],
                )
            }
            Kind::Film => {
                let (a, n) = (
                    ADJECTIVES.choose(rng).unwrap_or(&"Silver"),
                    NOUNS.choose(rng).unwrap_or(&"Orchard"),
                );
                (format!("The {a} {n} of {}", word(rng, 2)), vec![])
            }
            Kind::Album => {
                let n = NOUNS.choose(rng).unwrap_or(&"Comet");
                (format!("{n}s of {}", word(rng, 2)), vec![])
            }
        };
        if used.insert(name.to_lowercase()) {
            return (name, aliases);
        }
    }
}

fn filler_sentence(kind: Kind, name: &str, choice: usize, year: u32) -> String {
    let options: [String; 2] = match kind {
        Kind::Film => [
            format!("It was released in {year}."),
            "It won a small festival prize.".into(),
        ],
        Kind::Album => [
            format!("It came out in {year}."),
            "It has eleven songs.".into(),
        ],
        Kind::Company => [
            format!("It opened in {year}."),
            "It employs about 300 people.".into(),
        ],
        Kind::Person => [
            format!("{name} wrote two novels."),
            format!("{name} worked as a teacher until {year}."),
        ],
        Kind::City => [
            "It lies on a wide river.".into(),
            format!("It was settled in {year}."),
        ],
        Kind::Country => [
            "It has a mild climate.".into(),
            format!("It became independent in {year}."),
        ],
    };
    options[choice % 2].clone()
}

impl World {
    fn generate(rng: &mut ChaCha8Rng, scale: usize) -> World {
        let counts = [
            (Kind::Country, 3 * scale),
            (Kind::City, 8 * scale),
            (Kind::Person, 24 * scale),
            (Kind::Company, 8 * scale),
            (Kind::Film, 12 * scale),
            (Kind::Album, 10 * scale),
        ];
        let mut used = HashSet::new();
        let (mut names, mut aliases, mut kinds) = (Vec::new(), Vec::new(), Vec::new());
        for (kind, n) in counts {
            for _ in 0..n {
                let (name, al) = fresh_name(rng, kind, &mut used);
                names.push(name);
                aliases.push(al);
                kinds.push(kind);
            }
        }
        let of_kind =
            |k: Kind| -> Vec<usize> { (0..kinds.len()).filter(|i| kinds[*i] == k).collect() };
        let mut facts = Vec::new();
        let mut ids = HashSet::new();
        let mut fact_id = |rng: &mut ChaCha8Rng| loop {
            let id = rng.random_range(10_000u64..1_000_000);
            if ids.insert(id) {
                return id;
            }
        };
        let cities = of_kind(Kind::City);
        let countries = of_kind(Kind::Country);
        let persons = of_kind(Kind::Person);
        // Cities spread over countries; each country's capital is one of its cities.
        let mut city_country = Vec::new();
        for (k, c) in cities.iter().enumerate() {
            let country = countries[k % countries.len()];
            city_country.push((*c, country));
        }
        for (city, country) in &city_country {
            let f = (rng.random_range(0..2), rng.random_range(1890..2020));
            facts.push(Fact {
                subject: *city,
                relation: Relation::LocatedIn,
                object: *country,
                filler: f,
                id: fact_id(rng),
            });
        }
        for country in &countries {
            let own: Vec<usize> = city_country
                .iter()
                .filter(|(_, k)| k == country)
                .map(|(c, _)| *c)
                .collect();
            if let Some(capital) = own.choose(rng) {
                let f = (rng.random_range(0..2), rng.random_range(1890..2020));
                facts.push(Fact {
                    subject: *country,
                    relation: Relation::Capital,
                    object: *capital,
                    filler: f,
                    id: fact_id(rng),
                });
            }
        }
        for p in &persons {
            let f = (rng.random_range(0..2), rng.random_range(1890..2000));
            let city = *cities.choose(rng).unwrap_or(&cities[0]);
            facts.push(Fact {
                subject: *p,
                relation: Relation::BornIn,
                object: city,
                filler: f,
                id: fact_id(rng),
            });
        }
        // Spouses: pair persons up (symmetric facts).
        let mut shuffled = persons.clone();
        shuffled.shuffle(rng);
        for pair in shuffled.chunks(2) {
            if let [a, b] = pair {
                for (s, o) in [(*a, *b), (*b, *a)] {
                    let f = (rng.random_range(0..2), rng.random_range(1890..2000));
                    facts.push(Fact {
                        subject: s,
                        relation: Relation::Spouse,
                        object: o,
                        filler: f,
                        id: fact_id(rng),
                    });
                }
            }
        }
        for (kind, relation, targets) in [
            (Kind::Company, Relation::FoundedBy, persons.clone()),
            (Kind::Film, Relation::ProducedBy, of_kind(Kind::Company)),
            (Kind::Album, Relation::Performer, persons.clone()),
        ] {
            for s in of_kind(kind) {
                let f = (rng.random_range(0..2), rng.random_range(1950..2020));
                let o = *targets.choose(rng).unwrap_or(&targets[0]);
                facts.push(Fact {
                    subject: s,
                    relation,
                    object: o,
                    filler: f,
                    id: fact_id(rng),
                });
            }
        }
        let mut facts_of = vec![Vec::new(); names.len()];
        for (i, f) in facts.iter().enumerate() {
            facts_of[f.subject].push(i);
        }
        World {
            names,
            aliases,
            kinds,
            facts,
            facts_of,
        }
    }

    fn paragraph_text(&self, fact: &Fact) -> String {
        let s = &self.names[fact.subject];
        let o = &self.names[fact.object];
        format!(
            "{} {}",
            fact.relation.sentence(s, o),
            filler_sentence(self.kinds[fact.subject], s, fact.filler.0, fact.filler.1)
        )
    }

    /// A chain of `hops` facts without repeated entities, by random walk; `None` if stuck.
    fn chain(&self, rng: &mut ChaCha8Rng, hops: usize) -> Option<Vec<usize>> {
        let start = rng.random_range(0..self.names.len());
        let mut chain = Vec::new();
        let mut seen = BTreeSet::from([start]);
        let mut at = start;
        for _ in 0..hops {
            let options: Vec<usize> = self.facts_of[at]
                .iter()
                .copied()
                .filter(|f| !seen.contains(&self.facts[*f].object))
                .collect();
            let f = *options.choose(rng)?;
            at = self.facts[f].object;
            seen.insert(at);
            chain.push(f);
        }
        Some(chain)
    }
}

/// Generate the synthetic data set (answerable questions, each followed by its unanswerable
/// twin when `unanswerable_twins`).
pub fn generate(config: &SynthConfig) -> Result<Vec<Record>> {
    if config.paragraphs < 4 {
        return Err(Error::SynthConfig {
            field: "paragraphs",
            reason: format!("{} < 4 (the longest chain)", config.paragraphs),
        });
    }
    if config
        .hop_weights
        .iter()
        .any(|w| !w.is_finite() || *w < 0.0)
        || config.hop_weights.iter().sum::<f64>() <= 0.0
    {
        return Err(Error::SynthConfig {
            field: "hop_weights",
            reason: format!(
                "{:?}: need non-negative weights, not all 0",
                config.hop_weights
            ),
        });
    }
    let mut rng = ChaCha8Rng::seed_from_u64(config.seed);
    let world = World::generate(&mut rng, 5);
    let total: f64 = config.hop_weights.iter().sum();
    let mut records = Vec::new();
    let mut used_ids = HashSet::new();
    let mut attempts = 0usize;
    while records.len() < config.questions * if config.unanswerable_twins { 2 } else { 1 } {
        attempts += 1;
        if attempts > 1000 * (config.questions + 1) {
            return Err(Error::SynthConfig {
                field: "questions",
                reason: format!("could only compose {} distinct questions", used_ids.len()),
            });
        }
        let u = rng.random::<f64>() * total;
        let hops = if u < config.hop_weights[0] {
            2
        } else if u < config.hop_weights[0] + config.hop_weights[1] {
            3
        } else {
            4
        };
        let Some(chain) = world.chain(&mut rng, hops) else {
            continue;
        };
        let prefix = if hops == 2 {
            "2hop".to_string()
        } else {
            format!("{hops}hop1")
        };
        let id = format!(
            "{prefix}__{}",
            chain
                .iter()
                .map(|f| world.facts[*f].id.to_string())
                .collect::<Vec<_>>()
                .join("_")
        );
        if !used_ids.insert(id.clone()) {
            continue;
        }
        let record = compose(&world, &chain, id, config.paragraphs, &mut rng);
        let twin = config
            .unanswerable_twins
            .then(|| unanswerable_twin(&world, &chain, &record, &mut rng));
        // Twins are adjacent, in random order (as a pair, like MuSiQue Full).
        match twin {
            Some(t) if rng.random_bool(0.5) => records.extend([t, record]),
            Some(t) => records.extend([record, t]),
            None => records.push(record),
        }
    }
    Ok(records)
}

/// Distractor facts for a chain: hard ones (same relations, or other facts of chain entities)
/// first, then random ones; never a chain fact, never the same (subject, relation) twice.
fn distractors(
    world: &World,
    chain: &[usize],
    n: usize,
    rng: &mut ChaCha8Rng,
    exclude: &HashSet<usize>,
) -> Vec<usize> {
    let chain_facts: HashSet<usize> = chain.iter().copied().collect();
    // A fact linking the same two entities as a chain fact (the reverse of a spouse fact)
    // would state that hop again: never a distractor.
    let pair = |f: &Fact| (f.subject.min(f.object), f.subject.max(f.object));
    let chain_pairs: HashSet<(usize, usize)> =
        chain.iter().map(|f| pair(&world.facts[*f])).collect();
    let exclude: HashSet<usize> = exclude
        .iter()
        .copied()
        .chain((0..world.facts.len()).filter(|f| chain_pairs.contains(&pair(&world.facts[*f]))))
        .collect();
    let exclude = &exclude;
    let relations: HashSet<Relation> = chain.iter().map(|f| world.facts[*f].relation).collect();
    let subjects: HashSet<usize> = chain.iter().map(|f| world.facts[*f].subject).collect();
    let mut hard: Vec<usize> = (0..world.facts.len())
        .filter(|f| !chain_facts.contains(f) && !exclude.contains(f))
        .filter(|f| {
            subjects.contains(&world.facts[*f].subject)
                || (relations.contains(&world.facts[*f].relation) && rng.random_bool(0.05))
        })
        .collect();
    hard.shuffle(rng);
    let mut picked: Vec<usize> = Vec::new();
    for f in hard {
        if picked.len() * 2 > n {
            break;
        }
        picked.push(f);
    }
    while picked.len() < n {
        let f = rng.random_range(0..world.facts.len());
        if !chain_facts.contains(&f) && !exclude.contains(&f) && !picked.contains(&f) {
            picked.push(f);
        }
    }
    picked
}

fn compose(
    world: &World,
    chain: &[usize],
    id: String,
    paragraphs: usize,
    rng: &mut ChaCha8Rng,
) -> Record {
    let facts: Vec<&Fact> = chain.iter().map(|f| &world.facts[*f]).collect();
    // Question: innermost noun phrase first.
    let mut phrase = world.names[facts[0].subject].clone();
    for f in &facts[..facts.len() - 1] {
        phrase = f.relation.noun_phrase(&phrase);
    }
    let last = facts[facts.len() - 1];
    let question = last.relation.question(&phrase);
    let mut chosen: Vec<(usize, bool)> = chain.iter().map(|f| (*f, true)).collect();
    chosen.extend(
        distractors(world, chain, paragraphs - chain.len(), rng, &HashSet::new())
            .into_iter()
            .map(|f| (f, false)),
    );
    chosen.shuffle(rng);
    let paragraphs: Vec<Paragraph> = chosen
        .iter()
        .enumerate()
        .map(|(idx, (f, supporting))| Paragraph {
            idx,
            title: world.names[world.facts[*f].subject].clone(),
            paragraph_text: world.paragraph_text(&world.facts[*f]),
            is_supporting: *supporting,
        })
        .collect();
    let question_decomposition = facts
        .iter()
        .enumerate()
        .map(|(k, f)| {
            let subject = if k == 0 {
                world.names[f.subject].clone()
            } else {
                format!("#{k}")
            };
            let position = chosen.iter().position(|(c, _)| *c == chain[k]);
            DecompositionStep {
                id: f.id,
                question: format!("{subject} >> {}", f.relation.label()),
                answer: world.names[f.object].clone(),
                paragraph_support_idx: position,
            }
        })
        .collect();
    Record {
        id,
        paragraphs,
        question,
        question_decomposition,
        answer: world.names[last.object].clone(),
        answer_aliases: world.aliases[last.object].clone(),
        answerable: true,
    }
}

/// The unanswerable twin: one supporting paragraph replaced by a fresh distractor.
fn unanswerable_twin(
    world: &World,
    chain: &[usize],
    record: &Record,
    rng: &mut ChaCha8Rng,
) -> Record {
    let mut twin = record.clone();
    twin.answerable = false;
    let removed_step = rng.random_range(0..chain.len());
    let used: HashSet<usize> = record
        .paragraphs
        .iter()
        .filter_map(|p| {
            world
                .facts
                .iter()
                .position(|f| world.paragraph_text(f) == p.paragraph_text)
        })
        .collect();
    let replacement = distractors(world, chain, 1, rng, &used);
    if let (Some(step), Some(f)) = (
        twin.question_decomposition.get_mut(removed_step),
        replacement.first(),
    ) {
        if let Some(idx) = step.paragraph_support_idx.take() {
            let fact = &world.facts[*f];
            twin.paragraphs[idx] = Paragraph {
                idx,
                title: world.names[fact.subject].clone(),
                paragraph_text: world.paragraph_text(fact),
                is_supporting: false,
            };
        }
    }
    twin
}
