//! The episode context through which a flow makes every node call, tool call and random draw,
//! and the replay machinery built on it.
use std::cell::RefCell;
use std::future::Future;
use std::pin::Pin;
use std::rc::Rc;
use std::task::{Context, Poll};
use std::time::Instant;

use rand::{RngCore, SeedableRng};
use rand_chacha::ChaCha8Rng;
use serde::de::DeserializeOwned;
use serde::Serialize;

use crate::backend::{Backend, CallSpec, Decoding, Message, NodeRequest, NodeResponse};
use crate::error::{BoxError, Error, Result};
use crate::exec::{Dispatcher, Executor};
use crate::node::{NodeKind, NodeSpec, NodeTable};
use crate::trace::{Event, Gold, GoldEvent, NodeCall, Output, RewardEvent, Step, ToolCall, Trace};

/// A flow: plain async Rust over an [`EpisodeContext`]. Loops, branches and scratchpad state are
/// ordinary Rust; every node call, tool call and random draw goes through the context.
#[allow(async_fn_in_trait)]
pub trait Flow {
    /// One dataset record.
    type Input;
    /// What an episode returns.
    type Output;
    /// The flow's name, nodes and declared transitions.
    fn spec(&self) -> crate::node::FlowSpec;
    /// Runs one episode. Must be deterministic given the context's outputs and draws.
    async fn run(&self, cx: &EpisodeContext, input: &Self::Input) -> Result<Self::Output>;
}

/// How an episode relates to a recorded trace.
#[derive(Debug, Clone, Default)]
pub struct ReplayPlan {
    /// The recorded trace steps are forced from.
    pub recorded: Option<Rc<Trace>>,
    /// Steps `0..forced_steps` are forced to their recorded outputs.
    pub forced_steps: usize,
    /// The output forced at step `forced_steps` (must be a model call); live policy after it.
    pub deviation: Option<Output>,
    /// Stop as soon as this reward is reported after the deviation step.
    pub stop_on_reward: Option<String>,
}

impl ReplayPlan {
    /// A live episode.
    pub fn live() -> Self {
        Self::default()
    }

    /// Replays `trace` with every step forced.
    pub fn full(trace: Rc<Trace>) -> Self {
        let forced_steps = trace.steps.len();
        ReplayPlan {
            recorded: Some(trace),
            forced_steps,
            deviation: None,
            stop_on_reward: None,
        }
    }

    /// Steps `0..step` forced, `output` at `step`, live after; stops when `stop_on_reward` is known.
    pub fn deviate(
        trace: Rc<Trace>,
        step: usize,
        output: Output,
        stop_on_reward: Option<String>,
    ) -> Self {
        ReplayPlan {
            recorded: Some(trace),
            forced_steps: step,
            deviation: Some(output),
            stop_on_reward,
        }
    }
}

/// Everything needed to start one episode.
#[derive(Debug, Clone)]
pub struct EpisodeSetup {
    /// The flow's declared nodes.
    pub nodes: Rc<NodeTable>,
    /// The episode id recorded in the trace.
    pub episode: u64,
    /// Seed of the context's random draws.
    pub seed: u64,
    /// Replay instructions.
    pub replay: ReplayPlan,
}

struct EpisodeState {
    nodes: Rc<NodeTable>,
    steps: Vec<Option<Step>>,
    rewards: Vec<RewardEvent>,
    gold: Vec<GoldEvent>,
    replay: ReplayPlan,
    rng: ChaCha8Rng,
    episode: u64,
    seed: u64,
    stopped: bool,
}

enum StepAction {
    Forced(Step),
    Deviate(Step, Output),
    Live,
}

impl EpisodeState {
    /// Reserves the next step and says how to fill it. `check` compares the recorded event with
    /// what the flow does now.
    fn begin(
        &mut self,
        found: &str,
        check: impl Fn(&Event) -> bool,
    ) -> Result<(usize, StepAction)> {
        let index = self.steps.len();
        self.steps.push(None);
        let plan = &self.replay;
        let recorded = match &plan.recorded {
            Some(trace)
                if index < plan.forced_steps
                    || (index == plan.forced_steps && plan.deviation.is_some()) =>
            {
                trace.steps.get(index).ok_or_else(|| Error::InvalidReplay {
                    index,
                    reason: format!("the recorded trace has only {} steps", trace.steps.len()),
                })?
            }
            _ => return Ok((index, StepAction::Live)),
        };
        if !check(&recorded.event) {
            return Err(Error::ReplayDivergence {
                index,
                expected: recorded.event.describe(),
                found: found.to_owned(),
            });
        }
        if index < plan.forced_steps {
            let mut step = recorded.clone();
            step.forced = true;
            return Ok((index, StepAction::Forced(step)));
        }
        match (&recorded.event, &plan.deviation) {
            (Event::Call(_), Some(output)) => {
                Ok((index, StepAction::Deviate(recorded.clone(), output.clone())))
            }
            _ => Err(Error::InvalidReplay {
                index,
                reason: format!(
                    "a deviation must be at a model call, not at {}",
                    recorded.event.describe()
                ),
            }),
        }
    }

    fn finish(&mut self, step: Step) {
        let index = step.index;
        if let Some(slot) = self.steps.get_mut(index) {
            *slot = Some(step);
        }
    }

    fn take_trace(&mut self) -> Trace {
        Trace {
            flow: self.nodes.flow().to_owned(),
            episode: self.episode,
            seed: self.seed,
            steps: std::mem::take(&mut self.steps)
                .into_iter()
                .flatten()
                .collect(),
            rewards: std::mem::take(&mut self.rewards),
            gold: std::mem::take(&mut self.gold),
            stopped_early: self.stopped,
        }
    }
}

/// The result of a node call.
#[derive(Debug, Clone, PartialEq)]
pub struct Called {
    /// The call's step index (for gold supervision).
    pub step: usize,
    /// The output.
    pub output: Output,
    /// Scores of all labels / candidates (classify / choose), or of all returned sequences.
    pub scores: Vec<f64>,
}

impl Called {
    /// The output text.
    pub fn text(&self) -> &str {
        &self.output.text
    }

    /// The chosen label / candidate index (0 for generate calls).
    pub fn choice(&self) -> usize {
        self.output.choice.unwrap_or(0)
    }
}

/// The context one episode runs in. Cheap handle; all state is shared with the executor side.
pub struct EpisodeContext {
    state: Rc<RefCell<EpisodeState>>,
    dispatcher: Dispatcher,
}

fn kind_mismatch(spec: &NodeSpec, called: &'static str) -> Error {
    Error::WrongNodeKind {
        node: spec.id.0.clone(),
        declared: spec.kind.name(),
        called,
    }
}

fn argmax(scores: &[f64]) -> usize {
    let mut best = 0;
    for (i, s) in scores.iter().enumerate() {
        if *s > scores[best] {
            best = i;
        }
    }
    best
}

impl EpisodeContext {
    fn spec(&self, node: &str) -> Result<NodeSpec> {
        Ok(self.state.borrow().nodes.get(node)?.clone())
    }

    /// Calls generate node `node` with `messages`; the decoding comes from its declaration.
    pub async fn generate(&self, node: &str, messages: Vec<Message>) -> Result<Called> {
        let spec = self.spec(node)?;
        let NodeKind::Generate {
            max_new_tokens,
            decoding,
            stop,
        } = &spec.kind
        else {
            return Err(kind_mismatch(&spec, "generate"));
        };
        let num_return_sequences = match decoding {
            Decoding::Beam { num_beams } | Decoding::DiverseBeam { num_beams, .. } => *num_beams,
            Decoding::Greedy | Decoding::Sample { .. } => 1,
        };
        let call = CallSpec::Generate {
            max_new_tokens: *max_new_tokens,
            decoding: decoding.clone(),
            num_return_sequences,
            stop: stop.clone(),
        };
        self.call(&spec, messages, call).await
    }

    /// Calls classify node `node`; the output is the label with the highest score.
    pub async fn classify(&self, node: &str, messages: Vec<Message>) -> Result<Called> {
        let spec = self.spec(node)?;
        let NodeKind::Classify { labels } = &spec.kind else {
            return Err(kind_mismatch(&spec, "classify"));
        };
        let call = CallSpec::Classify {
            labels: labels.clone(),
        };
        self.call(&spec, messages, call).await
    }

    /// Calls choose node `node` over `candidates`; the output is the best-scored candidate.
    pub async fn choose(
        &self,
        node: &str,
        messages: Vec<Message>,
        candidates: Vec<String>,
    ) -> Result<Called> {
        let spec = self.spec(node)?;
        if !matches!(spec.kind, NodeKind::Choose) {
            return Err(kind_mismatch(&spec, "choose"));
        }
        if candidates.is_empty() {
            return Err(Error::InvalidNode {
                node: node.to_owned(),
                reason: "choose called with no candidates".into(),
            });
        }
        self.call(&spec, messages, CallSpec::Choose { candidates })
            .await
    }

    async fn call(
        &self,
        spec: &NodeSpec,
        messages: Vec<Message>,
        call: CallSpec,
    ) -> Result<Called> {
        let found = format!("{} call to node `{}`", call.name(), spec.id);
        let (index, action) = self.state.borrow_mut().begin(&found, |event| {
            matches!(event, Event::Call(c) if c.node == spec.id && c.call == call && c.messages == messages)
        })?;
        let step = match action {
            StepAction::Forced(step) => step,
            StepAction::Deviate(recorded, output) => {
                let Event::Call(mut recorded_call) = recorded.event else {
                    return Err(Error::InvalidReplay {
                        index,
                        reason: "deviation step is not a model call".into(),
                    });
                };
                recorded_call.output = output;
                recorded_call.deviated = true;
                Step {
                    index,
                    forced: false,
                    wall_us: 0,
                    event: Event::Call(recorded_call),
                }
            }
            StepAction::Live => {
                let request = NodeRequest {
                    node: spec.id.clone(),
                    adapter: spec.adapter.clone(),
                    messages,
                    call,
                };
                let started = Instant::now();
                let response = self.dispatcher.request(request.clone()).await;
                let wall_us = started.elapsed().as_micros() as u64;
                let output = interpret(&request, &response)?;
                Step {
                    index,
                    forced: false,
                    wall_us,
                    event: Event::Call(NodeCall {
                        node: request.node,
                        adapter: request.adapter,
                        messages: request.messages,
                        call: request.call,
                        prompt_ids: response.prompt_ids,
                        output,
                        alternatives: response.outputs,
                        deviated: false,
                    }),
                }
            }
        };
        let called = match &step.event {
            Event::Call(c) => Called {
                step: index,
                output: c.output.clone(),
                scores: c.alternatives.iter().map(|a| a.logprob).collect(),
            },
            _ => {
                return Err(Error::InvalidReplay {
                    index,
                    reason: "model call step holds no call".into(),
                })
            }
        };
        self.state.borrow_mut().finish(step);
        Ok(called)
    }

    /// Runs tool `tool` on `input` (live: calls `f`; replayed: returns the recorded output).
    pub fn tool<I, T, E>(
        &self,
        tool: &str,
        input: &I,
        f: impl FnOnce(&I) -> std::result::Result<T, E>,
    ) -> Result<T>
    where
        I: Serialize,
        T: Serialize + DeserializeOwned,
        E: Into<BoxError>,
    {
        let spec = self.spec(tool)?;
        if !matches!(spec.kind, NodeKind::Tool) {
            return Err(kind_mismatch(&spec, "tool"));
        }
        let tool_error = |source| Error::ToolValue {
            tool: tool.to_owned(),
            source,
        };
        let input_value = serde_json::to_value(input).map_err(tool_error)?;
        let found = format!("tool call `{tool}`");
        let (index, action) = self.state.borrow_mut().begin(&found, |event| {
            matches!(event, Event::Tool(t) if t.tool.as_str() == tool && t.input == input_value)
        })?;
        let (step, value) = match action {
            StepAction::Forced(step) => {
                let Event::Tool(t) = &step.event else {
                    return Err(Error::InvalidReplay {
                        index,
                        reason: "tool step holds no tool call".into(),
                    });
                };
                let value = serde_json::from_value(t.output.clone()).map_err(tool_error)?;
                (step, value)
            }
            StepAction::Deviate(..) => {
                return Err(Error::InvalidReplay {
                    index,
                    reason: format!("tool `{tool}` cannot be deviated"),
                })
            }
            StepAction::Live => {
                let started = Instant::now();
                let value = f(input).map_err(|e| Error::Tool {
                    tool: tool.to_owned(),
                    source: e.into(),
                })?;
                let output = serde_json::to_value(&value).map_err(tool_error)?;
                let step = Step {
                    index,
                    forced: false,
                    wall_us: started.elapsed().as_micros() as u64,
                    event: Event::Tool(ToolCall {
                        tool: spec.id.clone(),
                        input: input_value,
                        output,
                    }),
                };
                (step, value)
            }
        };
        self.state.borrow_mut().finish(step);
        Ok(value)
    }

    /// 64 random bits (recorded; forced on replay).
    pub fn random_u64(&self) -> Result<u64> {
        let mut state = self.state.borrow_mut();
        let (index, action) =
            state.begin("a random draw", |e| matches!(e, Event::Random { .. }))?;
        let step = match action {
            StepAction::Forced(step) => step,
            StepAction::Deviate(..) => {
                return Err(Error::InvalidReplay {
                    index,
                    reason: "a random draw cannot be deviated".into(),
                })
            }
            StepAction::Live => Step {
                index,
                forced: false,
                wall_us: 0,
                event: Event::Random {
                    value: state.rng.next_u64(),
                },
            },
        };
        let value = match step.event {
            Event::Random { value } => value,
            _ => 0,
        };
        state.finish(step);
        Ok(value)
    }

    /// A uniform draw in [0, 1) (53 random bits).
    pub fn random_f64(&self) -> Result<f64> {
        Ok((self.random_u64()? >> 11) as f64 / (1u64 << 53) as f64)
    }

    /// A uniform index in `0..n` (`n > 0`; 0 when `n == 0`).
    pub fn random_below(&self, n: usize) -> Result<usize> {
        let bits = self.random_u64()?;
        Ok(if n == 0 {
            0
        } else {
            ((bits as u128 * n as u128) >> 64) as usize
        })
    }

    /// Reports reward `name`; a rollout routed to it stops here (before its next call).
    pub fn reward(&self, name: &str, value: f64) {
        let mut state = self.state.borrow_mut();
        let after_steps = state.steps.len();
        let past_deviation =
            state.replay.deviation.is_some() && after_steps > state.replay.forced_steps;
        if past_deviation && state.replay.stop_on_reward.as_deref() == Some(name) {
            state.stopped = true;
        }
        state.rewards.push(RewardEvent {
            name: name.to_owned(),
            value,
            after_steps,
        });
    }

    /// Supplies the gold completion text for the call at `call.step`.
    pub fn gold_target(&self, call: &Called, text: impl Into<String>) {
        self.state.borrow_mut().gold.push(GoldEvent {
            step: call.step,
            gold: Gold::Target { text: text.into() },
        });
    }

    /// Supplies the gold label index for the classify call at `call.step`.
    pub fn gold_label(&self, call: &Called, index: usize) {
        self.state.borrow_mut().gold.push(GoldEvent {
            step: call.step,
            gold: Gold::Label { index },
        });
    }

    /// A flow-level error with the flow's name.
    pub fn error(&self, message: impl Into<String>) -> Error {
        Error::Flow {
            flow: self.state.borrow().nodes.flow().to_owned(),
            message: message.into(),
        }
    }

    /// The episode id.
    pub fn episode(&self) -> u64 {
        self.state.borrow().episode
    }
}

/// Checks a response against its request and picks the output the flow sees.
fn interpret(request: &NodeRequest, response: &NodeResponse) -> Result<Output> {
    let bad = |reason: String| Error::BadResponse {
        node: request.node.0.clone(),
        reason,
    };
    let outputs = &response.outputs;
    match &request.call {
        CallSpec::Generate { .. } => outputs
            .first()
            .map(|c| Output::from_candidate(c, None))
            .ok_or_else(|| bad("a generate response has no outputs".into())),
        CallSpec::Classify { labels: options }
        | CallSpec::Choose {
            candidates: options,
        } => {
            if outputs.len() != options.len() {
                return Err(bad(format!(
                    "{} scored options for {} labels/candidates",
                    outputs.len(),
                    options.len()
                )));
            }
            let scores: Vec<f64> = outputs.iter().map(|c| c.logprob).collect();
            if scores.iter().any(|s| s.is_nan()) {
                return Err(bad("a score is NaN".into()));
            }
            let best = argmax(&scores);
            Ok(Output::from_candidate(&outputs[best], Some(best)))
        }
    }
}

/// An episode's result: the flow's output (unless stopped early) and its trace.
#[derive(Debug, Clone)]
pub struct EpisodeOutcome<O> {
    /// The flow's output; `None` if the run stopped early on its routed reward.
    pub output: Option<O>,
    /// The trace.
    pub trace: Trace,
}

struct Play<'a, O> {
    inner: Option<Pin<Box<dyn Future<Output = Result<O>> + 'a>>>,
    state: Rc<RefCell<EpisodeState>>,
    span: tracing::Span,
}

impl<'a, O> Future for Play<'a, O> {
    type Output = Result<EpisodeOutcome<O>>;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let span = self.span.clone();
        let _entered = span.enter();
        let Some(inner) = self.inner.as_mut() else {
            return Poll::Pending;
        };
        let poll = inner.as_mut().poll(cx);
        let output = match poll {
            Poll::Ready(result) => {
                // It finished on its own: not cut short, even if its routed reward was reported.
                self.state.borrow_mut().stopped = false;
                Some(result)
            }
            Poll::Pending if self.state.borrow().stopped => None,
            Poll::Pending => return Poll::Pending,
        };
        // Dropping the flow withdraws any request it left queued.
        self.inner = None;
        let trace = self.state.borrow_mut().take_trace();
        Poll::Ready(match output {
            Some(Ok(o)) => Ok(EpisodeOutcome {
                output: Some(o),
                trace,
            }),
            Some(Err(e)) => Err(e),
            None => Ok(EpisodeOutcome {
                output: None,
                trace,
            }),
        })
    }
}

/// The future of one episode of `flow` on `input`, sending its node calls through `dispatcher`.
pub fn play<'a, F: Flow>(
    flow: &'a F,
    input: &'a F::Input,
    setup: EpisodeSetup,
    dispatcher: Dispatcher,
) -> impl Future<Output = Result<EpisodeOutcome<F::Output>>> + 'a {
    let span = tracing::debug_span!(
        "episode",
        episode = setup.episode,
        forced = setup.replay.forced_steps
    );
    let state = Rc::new(RefCell::new(EpisodeState {
        nodes: setup.nodes,
        steps: Vec::new(),
        rewards: Vec::new(),
        gold: Vec::new(),
        replay: setup.replay,
        rng: ChaCha8Rng::seed_from_u64(setup.seed),
        episode: setup.episode,
        seed: setup.seed,
        stopped: false,
    }));
    let cx = EpisodeContext {
        state: state.clone(),
        dispatcher,
    };
    let inner: Pin<Box<dyn Future<Output = Result<F::Output>> + 'a>> =
        Box::pin(async move { flow.run(&cx, input).await });
    Play {
        inner: Some(inner),
        state,
        span,
    }
}

/// Runs one episode to completion against `backend` (a convenience over [`Executor`]).
pub fn run_episode<F: Flow>(
    flow: &F,
    input: &F::Input,
    setup: EpisodeSetup,
    backend: &mut dyn Backend,
) -> Result<EpisodeOutcome<F::Output>> {
    let mut executor = Executor::new();
    executor.spawn(play(flow, input, setup, executor.dispatcher()));
    let mut done = executor.run(backend)?;
    match done.pop() {
        Some((_, outcome)) => outcome,
        None => Err(Error::Stalled { tasks: 0 }),
    }
}

/// Derives a well-mixed 64-bit seed from a base seed and a stream of integers (SplitMix64).
pub fn derive_seed(base: u64, parts: &[u64]) -> u64 {
    let mut x = base;
    for p in parts.iter().chain(std::iter::once(&0x9E37_79B9_7F4A_7C15)) {
        x ^= p.wrapping_add(0x9E37_79B9_7F4A_7C15);
        x = x.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = x;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        x = z ^ (z >> 31);
    }
    x
}
