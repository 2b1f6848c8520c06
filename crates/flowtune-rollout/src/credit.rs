//! One-step-deviation credit assignment for one episode.
//!
//! The episode runs live; then, for each selected call k, alternatives are formed (other label,
//! next-best candidate, diverse-beam or sampled sequences) and the flow is replayed with calls
//! `0..k` forced, the alternative at k and the live policy after, until the episode ends or the
//! reward routed to k's node is known. All of this is one async task, so every request of every
//! rollout joins the executor's batches.
use std::collections::BTreeMap;
use std::rc::Rc;

use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use serde::{Deserialize, Serialize};

use flowtune_graph::{
    derive_seed, join_all, play, Backend, CallSpec, Decoding, Dispatcher, EpisodeSetup, Event,
    Flow, Gold, NodeCall, NodeId, NodeRequest, NodeTable, Output, ReplayPlan, Trace,
};

use crate::config::{CallSelection, CreditConfig, GenerateAlternatives, PairMode};
use crate::error::{BoxError, Error, Result};
use crate::feedback::{Feedback, Label, Preference, Target};

/// An evaluator hook (e.g. an LM judge) for reward-free tasks: compares two runs that differ from
/// step `step` on. Returns a signed strength: positive prefers `b`, negative prefers `a`, 0 ties.
pub trait EpisodeJudge {
    /// Compares run `a` (the original output at `step`) with run `b` (an alternative).
    fn compare(
        &mut self,
        node: &NodeId,
        step: usize,
        a: &Trace,
        b: &Trace,
    ) -> std::result::Result<f64, BoxError>;
}

/// A deviated call and its alternatives.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct DeviationPoint {
    /// The call's step.
    pub step: usize,
    /// Its node.
    pub node: NodeId,
    /// The alternative outputs tried.
    pub alternatives: Vec<Output>,
}

/// One rollout: the episode replayed with one alternative at one step.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Rollout {
    /// The deviated step.
    pub step: usize,
    /// Index into the point's alternatives.
    pub alternative: usize,
    /// The rollout's trace (`stopped_early` when the routed reward stopped it).
    pub trace: Trace,
}

/// An episode with its rollouts, before feedback is built.
#[derive(Debug, Clone)]
pub struct EpisodeRun<O> {
    /// The flow's output for the live episode.
    pub output: Option<O>,
    /// The live episode's trace.
    pub trace: Rc<Trace>,
    /// The deviated calls.
    pub points: Vec<DeviationPoint>,
    /// The rollouts, point by point, alternative by alternative.
    pub rollouts: Vec<Rollout>,
    /// Live requests made for generate alternatives, and their token counts (prompt, output).
    pub alternative_requests: (u64, u64, u64),
}

/// Per-episode accounting.
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize, Deserialize)]
pub struct Accounting {
    /// Live model calls in the episode itself.
    pub episode_calls: u64,
    /// Live model calls in its rollouts (after the deviation points).
    pub rollout_calls: u64,
    /// Requests made for generate alternatives.
    pub alternative_calls: u64,
    /// Steps replayed from the record (no backend work).
    pub forced_steps: u64,
    /// Deviated calls.
    pub deviation_points: u64,
    /// Rollouts run.
    pub rollouts: u64,
    /// Rollouts stopped early on their routed reward.
    pub stopped_early: u64,
    /// Prompt tokens sent (plus scored label / candidate tokens).
    pub tokens_in: u64,
    /// Tokens generated.
    pub tokens_out: u64,
    /// Preference records emitted.
    pub preferences: u64,
    /// Pairs dropped as ties.
    pub ties: u64,
    /// Pairs dropped because a routed reward was never reported.
    pub unrewarded: u64,
    /// Target records.
    pub targets: u64,
    /// Label records.
    pub labels: u64,
}

impl Accounting {
    /// All live model calls (episode, rollouts, alternatives).
    pub fn node_calls(&self) -> u64 {
        self.episode_calls + self.rollout_calls + self.alternative_calls
    }

    /// Adds another episode's counts.
    pub fn add(&mut self, o: &Accounting) {
        self.episode_calls += o.episode_calls;
        self.rollout_calls += o.rollout_calls;
        self.alternative_calls += o.alternative_calls;
        self.forced_steps += o.forced_steps;
        self.deviation_points += o.deviation_points;
        self.rollouts += o.rollouts;
        self.stopped_early += o.stopped_early;
        self.tokens_in += o.tokens_in;
        self.tokens_out += o.tokens_out;
        self.preferences += o.preferences;
        self.ties += o.ties;
        self.unrewarded += o.unrewarded;
        self.targets += o.targets;
        self.labels += o.labels;
    }
}

/// Shared, read-only inputs of credit assignment.
#[derive(Debug, Clone)]
pub struct CreditSetup {
    /// The flow's nodes.
    pub nodes: Rc<NodeTable>,
    /// Settings.
    pub config: CreditConfig,
    /// Whether an evaluator judges pairs (then rollouts run to the end).
    pub judged: bool,
}

fn select_points(trace: &Trace, setup: &CreditSetup, seed: u64) -> Vec<(usize, NodeId)> {
    let mut by_node: BTreeMap<&NodeId, Vec<usize>> = BTreeMap::new();
    for step in &trace.steps {
        if let Event::Call(c) = &step.event {
            if !step.forced && !c.deviated {
                by_node.entry(&c.node).or_default().push(step.index);
            }
        }
    }
    let mut points = Vec::new();
    for (node_index, (node, steps)) in by_node.into_iter().enumerate() {
        let dev = setup.config.deviation(node.as_str());
        if !dev.enabled || dev.max_alternatives == 0 {
            continue;
        }
        let chosen: Vec<usize> = match &dev.calls {
            CallSelection::All => steps,
            CallSelection::First { n } => steps.into_iter().take(*n).collect(),
            CallSelection::Occurrences { indices } => steps
                .into_iter()
                .enumerate()
                .filter(|(i, _)| indices.contains(i))
                .map(|(_, s)| s)
                .collect(),
            CallSelection::Random { n } => {
                let mut rng = ChaCha8Rng::seed_from_u64(derive_seed(seed, &[1, node_index as u64]));
                let mut steps = steps;
                let take = (*n).min(steps.len());
                for i in 0..take {
                    let j = rng.random_range(i..steps.len());
                    steps.swap(i, j);
                }
                steps.truncate(take);
                steps
            }
        };
        points.extend(chosen.into_iter().map(|s| (s, node.clone())));
    }
    points.sort();
    points
}

/// Scored options other than the chosen one, best score first (ties: lower index first).
fn ranked_others(call: &NodeCall, max: usize) -> Vec<Output> {
    let chosen = call.output.choice;
    let mut order: Vec<usize> = (0..call.alternatives.len())
        .filter(|i| Some(*i) != chosen)
        .collect();
    order.sort_by(|a, b| {
        call.alternatives[*b]
            .logprob
            .total_cmp(&call.alternatives[*a].logprob)
            .then(a.cmp(b))
    });
    order
        .into_iter()
        .take(max)
        .map(|i| Output::from_candidate(&call.alternatives[i], Some(i)))
        .collect()
}

fn distinct_sequences<'c>(
    original: &Output,
    candidates: impl Iterator<Item = &'c flowtune_graph::Candidate>,
    max: usize,
) -> Vec<Output> {
    let mut seen = vec![original.ids.clone()];
    let mut out = Vec::new();
    for c in candidates {
        if out.len() >= max {
            break;
        }
        if !seen.contains(&c.ids) {
            seen.push(c.ids.clone());
            out.push(Output::from_candidate(c, None));
        }
    }
    out
}

/// Runs one episode live, then its one-step-deviation rollouts, all through `dispatcher`.
pub async fn run_with_credit<'a, F: Flow>(
    flow: &'a F,
    input: &'a F::Input,
    setup: &'a CreditSetup,
    episode: u64,
    seed: u64,
    dispatcher: Dispatcher,
) -> Result<EpisodeRun<F::Output>> {
    let live = EpisodeSetup {
        nodes: setup.nodes.clone(),
        episode,
        seed,
        replay: ReplayPlan::live(),
    };
    let outcome = play(flow, input, live, dispatcher.clone()).await?;
    let trace = Rc::new(outcome.trace);
    let selected = select_points(&trace, setup, seed);

    // Alternatives: immediate for classify / choose / recorded beams, one request otherwise.
    let mut points = Vec::with_capacity(selected.len());
    let mut requests = Vec::new();
    for (step, node) in selected {
        let Some(call) = trace.call(step) else {
            continue;
        };
        let dev = setup.config.deviation(node.as_str());
        let max = dev.max_alternatives;
        let alternatives = match (&call.call, &dev.generate) {
            (CallSpec::Classify { .. } | CallSpec::Choose { .. }, _) => ranked_others(call, max),
            (CallSpec::Generate { .. }, GenerateAlternatives::Recorded) => {
                distinct_sequences(&call.output, call.alternatives.iter(), max)
            }
            (
                CallSpec::Generate {
                    max_new_tokens,
                    stop,
                    ..
                },
                alt,
            ) => {
                let (decoding, n) = match alt {
                    GenerateAlternatives::DiverseBeam {
                        num_beams,
                        num_beam_groups,
                        diversity_penalty,
                    } => (
                        Decoding::DiverseBeam {
                            num_beams: *num_beams,
                            num_beam_groups: *num_beam_groups,
                            diversity_penalty: *diversity_penalty,
                        },
                        *num_beams,
                    ),
                    GenerateAlternatives::Sample {
                        n,
                        temperature,
                        top_p,
                        top_k,
                    } => (
                        Decoding::Sample {
                            temperature: *temperature,
                            top_p: *top_p,
                            top_k: *top_k,
                            seed: derive_seed(seed, &[2, step as u64]),
                        },
                        *n,
                    ),
                    GenerateAlternatives::Recorded => (Decoding::Greedy, 1),
                };
                requests.push((
                    points.len(),
                    NodeRequest {
                        node: call.node.clone(),
                        adapter: call.adapter.clone(),
                        messages: call.messages.clone(),
                        call: CallSpec::Generate {
                            max_new_tokens: *max_new_tokens,
                            decoding,
                            num_return_sequences: n,
                            stop: stop.clone(),
                        },
                    },
                ));
                Vec::new()
            }
        };
        points.push(DeviationPoint {
            step,
            node,
            alternatives,
        });
    }
    let mut alternative_requests = (requests.len() as u64, 0, 0);
    let responses = join_all(requests.iter().map(|(_, r)| dispatcher.request(r.clone()))).await;
    for ((point_index, _), response) in requests.iter().zip(responses) {
        alternative_requests.1 += response.prompt_ids.len() as u64;
        alternative_requests.2 += response
            .outputs
            .iter()
            .map(|c| c.ids.len() as u64)
            .sum::<u64>();
        let point = &mut points[*point_index];
        if let Some(call) = trace.call(point.step) {
            let max = setup.config.deviation(point.node.as_str()).max_alternatives;
            point.alternatives = distinct_sequences(&call.output, response.outputs.iter(), max);
        }
    }

    // Rollouts.
    let mut plans = Vec::new();
    for point in &points {
        let stop_on = (setup.config.early_termination && !setup.judged)
            .then(|| setup.config.reward_of(point.node.as_str()).to_owned());
        for (a, alt) in point.alternatives.iter().enumerate() {
            let rollout_setup = EpisodeSetup {
                nodes: setup.nodes.clone(),
                episode,
                seed: derive_seed(seed, &[3, point.step as u64, a as u64]),
                replay: ReplayPlan::deviate(
                    trace.clone(),
                    point.step,
                    alt.clone(),
                    stop_on.clone(),
                ),
            };
            plans.push((
                point.step,
                a,
                play(flow, input, rollout_setup, dispatcher.clone()),
            ));
        }
    }
    let keys: Vec<(usize, usize)> = plans.iter().map(|(s, a, _)| (*s, *a)).collect();
    let outcomes = join_all(plans.into_iter().map(|(_, _, f)| f)).await;
    let mut rollouts = Vec::with_capacity(outcomes.len());
    for ((step, alternative), outcome) in keys.into_iter().zip(outcomes) {
        rollouts.push(Rollout {
            step,
            alternative,
            trace: outcome?.trace,
        });
    }
    Ok(EpisodeRun {
        output: outcome.output,
        trace,
        points,
        rollouts,
        alternative_requests,
    })
}

fn call_tokens(call: &NodeCall) -> (u64, u64) {
    let scored: u64 = call.alternatives.iter().map(|c| c.ids.len() as u64).sum();
    match call.call {
        CallSpec::Generate { .. } => (call.prompt_ids.len() as u64, scored),
        _ => (call.prompt_ids.len() as u64 + scored, 0),
    }
}

/// Counts an episode's work.
pub fn account<O>(run: &EpisodeRun<O>) -> Accounting {
    let mut a = Accounting {
        alternative_calls: run.alternative_requests.0,
        tokens_in: run.alternative_requests.1,
        tokens_out: run.alternative_requests.2,
        deviation_points: run.points.len() as u64,
        rollouts: run.rollouts.len() as u64,
        ..Accounting::default()
    };
    for (_, call) in run.trace.live_calls() {
        a.episode_calls += 1;
        let (i, o) = call_tokens(call);
        a.tokens_in += i;
        a.tokens_out += o;
    }
    for r in &run.rollouts {
        a.stopped_early += r.trace.stopped_early as u64;
        for step in &r.trace.steps {
            match &step.event {
                _ if step.forced => a.forced_steps += 1,
                Event::Call(call) if !call.deviated => {
                    a.rollout_calls += 1;
                    let (i, o) = call_tokens(call);
                    a.tokens_in += i;
                    a.tokens_out += o;
                }
                _ => {}
            }
        }
    }
    a
}

/// Builds the episode's feedback: preferences from its rollouts (rewards routed per node, or
/// the judge), Target / Label records from the gold the flow supplied. Updates `accounting`.
pub fn build_feedback<O>(
    run: &EpisodeRun<O>,
    config: &CreditConfig,
    mut judge: Option<&mut dyn EpisodeJudge>,
    backend: &mut dyn Backend,
    accounting: &mut Accounting,
) -> Result<Vec<Feedback>> {
    let trace = &run.trace;
    let mut feedback = Vec::new();
    for point in &run.points {
        let Some(call) = trace.call(point.step) else {
            continue;
        };
        // Option 0 is the original output, i > 0 the (i-1)-th alternative.
        let mut options: Vec<(&Output, &Trace)> = vec![(&call.output, trace.as_ref())];
        for r in run.rollouts.iter().filter(|r| r.step == point.step) {
            if let Some(alt) = point.alternatives.get(r.alternative) {
                options.push((alt, &r.trace));
            }
        }
        let pairs: Vec<(usize, usize)> = match config.pairs {
            PairMode::AgainstOriginal => (1..options.len()).map(|j| (0, j)).collect(),
            PairMode::AllPairs => (0..options.len())
                .flat_map(|i| (i + 1..options.len()).map(move |j| (i, j)))
                .collect(),
        };
        let reward = config.reward_of(point.node.as_str());
        for (i, j) in pairs {
            let delta = match judge.as_deref_mut() {
                Some(judge) => judge
                    .compare(&point.node, point.step, options[i].1, options[j].1)
                    .map_err(|source| Error::Evaluator {
                        node: point.node.0.clone(),
                        step: point.step,
                        source,
                    })?,
                None => {
                    let ri = options[i].1.reward_after(reward, Some(point.step));
                    let rj = options[j].1.reward_after(reward, Some(point.step));
                    match (ri, rj) {
                        (Some(ri), Some(rj)) => rj - ri,
                        _ => {
                            accounting.unrewarded += 1;
                            continue;
                        }
                    }
                }
            };
            if delta.is_nan() || delta.abs() <= config.tie_tolerance {
                accounting.ties += 1;
                continue;
            }
            let (chosen, rejected) = if delta > 0.0 {
                (options[j].0, options[i].0)
            } else {
                (options[i].0, options[j].0)
            };
            accounting.preferences += 1;
            feedback.push(Feedback::Preference(Preference {
                node: point.node.clone(),
                episode: trace.episode,
                step: point.step,
                prompt_ids: call.prompt_ids.clone(),
                chosen: chosen.ids.clone(),
                rejected: rejected.ids.clone(),
                chosen_text: chosen.text.clone(),
                rejected_text: rejected.text.clone(),
                weight: delta.abs(),
            }));
        }
    }

    // Gold supervision; targets are tokenized in one backend call per node.
    let mut targets: BTreeMap<NodeId, Vec<(usize, &NodeCall, &str)>> = BTreeMap::new();
    for gold in &trace.gold {
        let bad = |reason: String| Error::BadGold {
            episode: trace.episode,
            step: gold.step,
            reason,
        };
        let call = trace
            .call(gold.step)
            .ok_or_else(|| bad("the step is not a model call".into()))?;
        match &gold.gold {
            Gold::Label { index } => {
                let CallSpec::Classify { labels } = &call.call else {
                    return Err(bad(format!("a gold label on a {} call", call.call.name())));
                };
                if *index >= labels.len() {
                    return Err(bad(format!(
                        "label index {index} with {} labels",
                        labels.len()
                    )));
                }
                accounting.labels += 1;
                feedback.push(Feedback::Label(Label {
                    node: call.node.clone(),
                    episode: trace.episode,
                    step: gold.step,
                    prompt_ids: call.prompt_ids.clone(),
                    labels: labels.clone(),
                    label_ids: call.alternatives.iter().map(|c| c.ids.clone()).collect(),
                    label: *index,
                    weight: config.supervision_weight,
                }));
            }
            Gold::Target { text } => targets
                .entry(call.node.clone())
                .or_default()
                .push((gold.step, call, text)),
        }
    }
    for (node, items) in targets {
        let texts: Vec<String> = items.iter().map(|(_, _, t)| (*t).to_owned()).collect();
        let ids = backend
            .tokenize(&node, &texts)
            .map_err(|source| Error::Tokenize {
                node: node.0.clone(),
                source,
            })?;
        if ids.len() != texts.len() {
            return Err(Error::Tokenize {
                node: node.0.clone(),
                source: format!("{} token lists for {} texts", ids.len(), texts.len()).into(),
            });
        }
        for ((step, call, text), target) in items.into_iter().zip(ids) {
            accounting.targets += 1;
            feedback.push(Feedback::Target(Target {
                node: node.clone(),
                episode: trace.episode,
                step,
                prompt_ids: call.prompt_ids.clone(),
                target,
                target_text: text.to_owned(),
                weight: config.supervision_weight,
            }));
        }
    }
    Ok(feedback)
}
