//! The `musique` command-line tool: train, evaluate and predict with the paper's MuSiQue flows.
//!
//! ```text
//! musique train   [--model PATH] [--data IN.jsonl] [--variant ans|full] [--out DIR] [--seed N] [--limit N] [--resume]
//! musique eval    [--model PATH] [--data IN.jsonl] [--variant ans|full] [--out DIR] [--limit N]
//! musique predict [--model PATH] [--data IN.jsonl] [--variant ans|full] [--out DIR] [--limit N]
//! musique score   --data IN.jsonl --predictions P.jsonl [--limit N] [--out metrics.json]
//! ```
//! Without `--data` the synthetic MuSiQue-like set is generated (seeded). `eval` writes
//! `DIR/predictions.jsonl`, `DIR/metrics.json` and `DIR/summary.json` (wall time after the
//! model load); `predict` the first and last; `train` writes `DIR/metrics.jsonl`,
//! `DIR/learning_curve.svg`, `DIR/checkpoints/` and `DIR/summary.json`.
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use clap::{Args, Parser, Subcommand, ValueEnum};
use indicatif::{ProgressBar, ProgressStyle};
use musique::app::{self, TrainOptions};
use musique::data::{load_jsonl, load_questions_jsonl, sample_matching_hops, Record};
use musique::flow::{default_prompt_dir, rewards, FlowOptions, MusiqueFlow, Variant};
use musique::synth::{generate, SynthConfig};
use musique::{Error, Result};

#[derive(Parser)]
#[command(
    name = "musique",
    about = "MuSiQue multi-hop QA with flowtune: online joint fine-tuning of the paper's flows"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Online training (one pass) with progressive validation, checkpoints and a learning curve.
    Train(TrainArgs),
    /// Predict and score: DIR/predictions.jsonl and DIR/metrics.json.
    Eval(Common),
    /// Predict only: DIR/predictions.jsonl.
    Predict(Common),
    /// Score a leaderboard prediction file against gold records (the official metrics) and
    /// print metrics.json.
    Score(ScoreArgs),
}

#[derive(Args)]
struct ScoreArgs {
    /// Gold MuSiQue JSONL.
    #[arg(long)]
    data: PathBuf,
    /// Predictions JSONL (leaderboard format, input order).
    #[arg(long)]
    predictions: PathBuf,
    /// Score only the first N gold records (and the first N predictions).
    #[arg(long)]
    limit: Option<usize>,
    /// Also write the metrics to this file (atomically).
    #[arg(long)]
    out: Option<PathBuf>,
}

#[derive(Clone, Copy, ValueEnum)]
enum VariantArg {
    /// MuSiQue-Answerable.
    Ans,
    /// MuSiQue-Full (sufficiency node, unanswerable twins).
    Full,
}

#[derive(Args, Clone)]
struct Common {
    /// Model: a GGUF file or an HF folder (default: the test model, SmolLM2-135M-Instruct).
    #[arg(long)]
    model: Option<PathBuf>,
    /// MuSiQue JSONL (default: the synthetic generator).
    #[arg(long)]
    data: Option<PathBuf>,
    /// Task variant.
    #[arg(long, value_enum, default_value = "ans")]
    variant: VariantArg,
    /// Output folder.
    #[arg(long, default_value = "runs/musique")]
    out: PathBuf,
    /// Seed (synthetic data, subsampling, episode seeds).
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Use at most this many records (synthetic: generate this many questions).
    #[arg(long)]
    limit: Option<usize>,
    /// eval/predict: start from the adapters of a `train` checkpoint (a folder like
    /// `runs/musique/checkpoints/episode-0000000064`, or the `checkpoints` folder itself for its
    /// latest one) instead of fresh ones.
    #[arg(long)]
    checkpoint: Option<PathBuf>,
    /// Subsample --limit records matching the hop distribution of this JSONL (e.g. the dev set).
    #[arg(long)]
    match_hops: Option<PathBuf>,
    /// Prompt templates folder (default: $FLOWTUNE_ROOT/prompts/musique).
    #[arg(long)]
    prompts: Option<PathBuf>,
    /// Episodes in flight (their node calls are batched together).
    #[arg(long, default_value_t = 8)]
    in_flight: usize,
    /// Keep the concise answer as generated (no mapping to a retrieved span).
    #[arg(long)]
    no_grounding: bool,
    /// Full: decide answerability per record instead of pairwise.
    #[arg(long)]
    no_pairwise: bool,
    /// Token budgets of the query, verbose-answer and concise-answer nodes.
    #[arg(long, value_delimiter = ',', num_args = 1..=3, default_values_t = [16, 32, 12])]
    max_new_tokens: Vec<usize>,
    /// Model dtype (bf16 is fastest on AMX CPUs and on GPUs).
    #[arg(long, value_enum, default_value = "bf16")]
    dtype: DtypeArg,
    /// Device (auto: CUDA when available).
    #[arg(long, value_enum, default_value = "auto")]
    device: DeviceArg,
    /// Decoder linear weights: `dense`, or `int4` (4-bit codes for decoding batches of up to
    /// 8 rows on the CPU: bf16/f16, or f32 on AVX-512 CPUs; a Q4_0/Q4_1 GGUF keeps its own blocks).
    #[arg(long, default_value = "dense")]
    weights: flowtune::lm::LinearWeights,
}

#[derive(Clone, Copy, ValueEnum)]
enum DtypeArg {
    /// 32-bit floats.
    F32,
    /// bfloat16.
    Bf16,
    /// float16 (GPU).
    F16,
}

#[derive(Clone, Copy, ValueEnum)]
enum DeviceArg {
    /// CUDA when available, else CPU.
    Auto,
    /// CPU.
    Cpu,
    /// The first CUDA device.
    Cuda,
}

#[derive(Args)]
struct TrainArgs {
    #[command(flatten)]
    common: Common,
    /// Continue from DIR/checkpoints/latest.
    #[arg(long)]
    resume: bool,
    /// Episodes per learning step.
    #[arg(long, default_value_t = 4)]
    minibatch: usize,
    /// Checkpoint every N episodes (rounded up to a multiple of the minibatch; 0: never).
    #[arg(long, default_value_t = 8)]
    checkpoint_every: u64,
    /// Gated soft reference update every N episodes (0: never; the paper: 100).
    #[arg(long, default_value_t = 16)]
    reference_every: u64,
    /// Write every minibatch's traces (episodes and rollouts) under DIR/traces/.
    #[arg(long)]
    save_traces: bool,
    /// Skip an episode whose flow code, rollouts or feedback fail (it is listed under
    /// `failures` in the checkpoint state and the summary) instead of ending the run.
    #[arg(long)]
    skip_failed_episodes: bool,
    /// Synthetic data only: also evaluate this many held-out synthetic questions (another
    /// seed's world) with the untrained adapters before training and the trained ones after,
    /// printed side by side and written to DIR/heldout.json (0: skip).
    #[arg(long, default_value_t = 16)]
    heldout: usize,
    /// Diverse-beam alternatives per query-node call, each rolled out until support F1 is
    /// known (the paper: 3; the default 0 keeps the CPU main job within minutes).
    #[arg(long, default_value_t = 0)]
    query_alternatives: usize,
    /// Diverse-beam alternatives per verbose-answer call, judged by the final answer F1
    /// (the paper: 3, i.e. four candidates).
    #[arg(long, default_value_t = 1)]
    answer_alternatives: usize,
    /// COCOB's warm-up strength α, roughly the number of learner steps before full-size
    /// moves (the paper: 1000; COCOB's own default: 100, which on the 64-episode synthetic run
    /// overshot: relevance label loss spiked to 3.2 and the stop node flipped between always-No
    /// and always-Yes, see docs/results.md).
    #[arg(long, default_value_t = 1000.0)]
    cocob_alpha: f64,
}

fn variant(v: VariantArg) -> Variant {
    match v {
        VariantArg::Ans => Variant::Answerable,
        VariantArg::Full => Variant::Full,
    }
}

/// Records from --data (validated, limited or hop-matched) or the synthetic generator.
fn load_records(c: &Common, default_questions: usize, seed_offset: u64) -> Result<Vec<Record>> {
    let Some(path) = &c.data else {
        let config = SynthConfig {
            seed: c.seed + seed_offset,
            questions: c.limit.unwrap_or(default_questions),
            unanswerable_twins: matches!(c.variant, VariantArg::Full),
            ..SynthConfig::default()
        };
        return generate(&config);
    };
    let records = load_jsonl(path)?;
    match (&c.match_hops, c.limit) {
        (Some(target), Some(n)) => {
            let target = load_questions_jsonl(target)?;
            sample_matching_hops(&records, &target, n.min(records.len()), c.seed)
        }
        (Some(_), None) => Err(Error::Flow("--match-hops needs --limit".into())),
        (None, Some(n)) => Ok(records.into_iter().take(n).collect()),
        (None, None) => Ok(records),
    }
}

fn build_flow(c: &Common) -> Result<MusiqueFlow> {
    let &[query, verbose, concise] = c.max_new_tokens.as_slice() else {
        return Err(Error::Flow(format!(
            "--max-new-tokens needs 3 values (query, verbose, concise), got {:?}",
            c.max_new_tokens
        )));
    };
    let options = FlowOptions {
        variant: variant(c.variant),
        grounded_answers: !c.no_grounding,
        max_new_tokens: [query, verbose, concise],
        ..FlowOptions::default()
    };
    let dir = c.prompts.clone().unwrap_or_else(default_prompt_dir);
    MusiqueFlow::from_prompt_dir(options, &dir)
}

/// The model to load: --model, else the test model.
fn model_path(c: &Common) -> Result<PathBuf> {
    match &c.model {
        Some(p) => Ok(p.clone()),
        None => locate_model(),
    }
}

#[cfg(feature = "lm")]
fn locate_model() -> Result<PathBuf> {
    flowtune::lm::locate_test_model().map_err(|e| Error::Flow(e.to_string()))
}

#[cfg(not(feature = "lm"))]
fn locate_model() -> Result<PathBuf> {
    Err(Error::Flow(
        "built without the `lm` feature: pass --model (and rebuild with --features lm to run it)"
            .into(),
    ))
}

/// The LM backend (one LoRA adapter per node, rank 8 rsLoRA on q/v as in the paper)
/// and the tch learner (DPO β 1 against each node's reference adapter, NLL, label
/// NLL, COCOB) for `flow`, sharing one engine.
#[cfg(feature = "lm")]
fn lm_backend(
    model: &Path,
    flow: &MusiqueFlow,
    c: &Common,
    cocob_alpha: f64,
) -> Result<(
    Box<dyn flowtune_graph::Backend>,
    Box<dyn flowtune_rollout::Learner>,
)> {
    use flowtune::cocob::CocobConfig;
    use flowtune::learner::LearnerConfig;
    use flowtune::lm::engine::{Engine, EngineConfig};
    use flowtune::lm::loader::{load, LoadOptions};
    use flowtune::lora::{LoraConfig, Module};
    use flowtune_graph::Flow;
    let lm = |e: &dyn std::fmt::Display| Error::Flow(format!("{}: {e}", model.display()));
    let device = match c.device {
        DeviceArg::Auto => flowtune::tch::Device::cuda_if_available(),
        DeviceArg::Cpu => flowtune::tch::Device::Cpu,
        DeviceArg::Cuda => flowtune::tch::Device::Cuda(0),
    };
    let dtype = match c.dtype {
        DtypeArg::F32 => flowtune::tch::Kind::Float,
        DtypeArg::Bf16 => flowtune::tch::Kind::BFloat16,
        DtypeArg::F16 => flowtune::tch::Kind::Half,
    };
    let opts = LoadOptions {
        device,
        dtype,
        linear_weights: c.weights,
    };
    let loaded = load(model, &opts).map_err(|e| lm(&e))?;
    let engine = Engine::new(loaded, EngineConfig::default()).map_err(|e| lm(&e))?;
    let nodes: Vec<flowtune_graph::NodeId> = flow
        .spec()
        .nodes
        .iter()
        .filter(|n| n.adapter.is_some())
        .map(|n| n.id.clone())
        .collect();
    let lora = LoraConfig::rslora(8, 16.0, &[Module::QProj, Module::VProj]);
    let rt =
        flowtune::runtime::LmRuntime::new(engine, &nodes, &lora, c.seed).map_err(|e| lm(&e))?;
    let learner = LearnerConfig {
        cocob: CocobConfig {
            alpha: cocob_alpha,
            ..CocobConfig::paper()
        },
        ..LearnerConfig::default()
    };
    Ok((Box::new(rt.backend()), Box::new(rt.learner(learner))))
}

#[cfg(not(feature = "lm"))]
fn lm_backend(
    model: &Path,
    _flow: &MusiqueFlow,
    _c: &Common,
    _cocob_alpha: f64,
) -> Result<(
    Box<dyn flowtune_graph::Backend>,
    Box<dyn flowtune_rollout::Learner>,
)> {
    Err(Error::Flow(format!(
        "cannot run {}: built without the `lm` feature",
        model.display()
    )))
}

/// A progress bar on a terminal; on a pipe or a log file (where the bar hides) a plain line
/// every 10 records and at the end, so long runs show their running metrics.
struct Progress {
    bar: ProgressBar,
    len: u64,
    plain: bool,
    started: std::time::Instant,
}

impl Progress {
    fn new(len: usize) -> Self {
        use std::io::IsTerminal;
        let bar = ProgressBar::new(len as u64);
        bar.set_style(
            ProgressStyle::with_template("{elapsed_precise} [{bar:30}] {pos}/{len} {msg}")
                .unwrap_or_else(|_| ProgressStyle::default_bar())
                .progress_chars("=> "),
        );
        Self {
            bar,
            len: len as u64,
            plain: !std::io::stderr().is_terminal(),
            started: std::time::Instant::now(),
        }
    }

    fn update(&self, pos: u64, msg: String) {
        self.bar.set_position(pos);
        if self.plain && pos > 0 && (pos.is_multiple_of(10) || pos == self.len) {
            eprintln!(
                "{:.0}s {pos}/{} {msg}",
                self.started.elapsed().as_secs_f64(),
                self.len
            );
        }
        self.bar.set_message(msg);
    }

    fn finish(&self) {
        self.bar.finish();
    }
}

fn running(sums: &mut [f64; 3], scores: [Option<f64>; 2]) -> String {
    for (k, s) in scores.iter().enumerate() {
        if let Some(v) = s {
            sums[k] += v;
        }
    }
    if scores.iter().any(Option::is_some) {
        sums[2] += 1.0;
    }
    let n = sums[2].max(1.0);
    format!("AnsF1 {:.3} SuppF1 {:.3}", sums[0] / n, sums[1] / n)
}

fn eval_or_predict(c: &Common, score: bool) -> Result<()> {
    let records = load_records(c, 100, 1_000)?;
    let flow = build_flow(c)?;
    // The optimizer setting is irrelevant here (no learning); a checkpoint's adapters load as saved.
    let (mut backend, mut learner) = lm_backend(&model_path(c)?, &flow, c, 1000.0)?;
    if let Some(dir) = &c.checkpoint {
        let dir = match std::fs::read_to_string(dir.join("latest")) {
            Ok(name) => dir.join(name.trim()),
            Err(_) => dir.clone(),
        };
        let learner_dir = dir.join("learner");
        learner
            .load(&learner_dir)
            .map_err(|e| Error::Flow(format!("{}: {e}", learner_dir.display())))?;
        eprintln!("adapters from {}", learner_dir.display());
    }
    let started = std::time::Instant::now();
    let pb = Progress::new(records.len());
    let mut sums = [0.0; 3];
    let gold: std::collections::HashMap<&str, &Record> =
        records.iter().map(|r| (r.id.as_str(), r)).collect();
    let outputs = app::predict(
        &flow,
        &records,
        backend.as_mut(),
        c.in_flight,
        c.seed,
        &mut |done, out| {
            let s = gold
                .get(out.prediction.id.as_str())
                .filter(|r| r.answerable)
                .map(|r| musique::metrics::score_record(r, &out.prediction));
            let msg = running(&mut sums, [s.map(|s| s.answer_f1), s.map(|s| s.support_f1)]);
            pb.update(done as u64, msg);
        },
    )?;
    pb.finish();
    let summary = app::PredictSummary {
        records: records.len(),
        wall_seconds: started.elapsed().as_secs_f64(),
    };
    let preds = app::predictions(
        &outputs,
        matches!(c.variant, VariantArg::Full) && !c.no_pairwise,
    );
    if score {
        let report = app::write_eval(&c.out, &records, &preds)?;
        print_metrics(&report, &c.out.join("metrics.json"))?;
    } else {
        musique::metrics::write_predictions_jsonl(&c.out.join("predictions.jsonl"), &preds)?;
    }
    musique::io::write_json_atomic(&c.out.join("summary.json"), &summary)?;
    eprintln!(
        "{} records in {:.1} s after loading",
        summary.records, summary.wall_seconds
    );
    println!("wrote {}", c.out.display());
    Ok(())
}

fn train(t: &TrainArgs) -> Result<()> {
    let c = &t.common;
    let records = load_records(c, 64, 0)?;
    let flow = build_flow(c)?;
    let (mut backend, mut learner) = lm_backend(&model_path(c)?, &flow, c, t.cocob_alpha)?;
    let options = TrainOptions {
        out_dir: c.out.clone(),
        seed: c.seed,
        minibatch_episodes: t.minibatch,
        episodes_in_flight: c.in_flight,
        checkpoint_every: t.checkpoint_every,
        reference_every: t.reference_every,
        resume: t.resume,
        save_traces: t.save_traces,
        skip_failed_episodes: t.skip_failed_episodes,
        query_alternatives: t.query_alternatives,
        answer_alternatives: t.answer_alternatives,
    };
    let heldout = if t.heldout > 0 && c.data.is_none() {
        let held = Common {
            limit: Some(t.heldout),
            ..c.clone()
        };
        Some(load_records(&held, t.heldout, 1_000)?)
    } else {
        None
    };
    let pairwise = matches!(c.variant, VariantArg::Full) && !c.no_pairwise;
    // The held-out questions' metrics under the adapters as they are now.
    let evaluate_heldout = |h: &[Record], backend: &mut dyn flowtune_graph::Backend| -> Result<_> {
        let out = app::predict(&flow, h, backend, c.in_flight, c.seed, &mut |_, _| {})?;
        musique::metrics::evaluate(h, &app::predictions(&out, pairwise))
    };
    let before = match &heldout {
        Some(h) => Some(evaluate_heldout(h, backend.as_mut())?),
        None => None,
    };
    let pb = Progress::new(records.len());
    let summary = app::train(
        &flow,
        &records,
        backend.as_mut(),
        learner.as_mut(),
        &options,
        &mut |done, last| {
            let msg = last
                .map(|m| {
                    let get = |k: &str| shown_metric(m.progressive.get(k).copied(), 3);
                    format!(
                        "AnsF1 {} SuppF1 {}",
                        get(rewards::ANSWER_F1),
                        get(rewards::SUPPORT_F1)
                    )
                })
                .unwrap_or_default();
            pb.update(done, msg);
        },
    )?;
    pb.finish();
    println!(
        "episodes: {}  wall: {:.1}s",
        summary.episodes, summary.wall_seconds
    );
    println!(
        "{:<14} {:>12} {:>12}",
        "progressive", "first 20%", "last 20%"
    );
    // A window without a record that has the metric (e.g. no answerable question among
    // MuSiQue-Full's first episodes) shows n/a.
    let keys: std::collections::BTreeSet<&String> = summary
        .first_window
        .keys()
        .chain(summary.last_window.keys())
        .collect();
    for key in keys {
        println!(
            "{:<14} {:>12} {:>12}",
            key,
            shown_metric(summary.first_window.get(key).copied(), 4),
            shown_metric(summary.last_window.get(key).copied(), 4)
        );
    }
    if let (Some(h), Some(before)) = (&heldout, before) {
        let after = evaluate_heldout(h, backend.as_mut())?;
        musique::io::write_json_atomic(
            &c.out.join("heldout.json"),
            &serde_json::json!({ "untrained": before, "trained": after }),
        )?;
        println!("held-out ({} records)   untrained   trained", h.len());
        println!(
            "answer_f1              {:>9.4} {:>9.4}",
            before.answer_f1, after.answer_f1
        );
        println!(
            "support_f1             {:>9.4} {:>9.4}",
            before.support_f1, after.support_f1
        );
    }
    if !summary.failures.is_empty() {
        println!(
            "{} episode(s) failed and were skipped (listed in {}):",
            summary.failures.len(),
            c.out.join("summary.json").display()
        );
        for f in &summary.failures {
            println!("  episode {}: {}", f.episode, f.error);
        }
    }
    println!("learning curve: {}", summary.plot_path.display());
    Ok(())
}

/// A metric with `digits` decimals, or `n/a` when there is none (or it is not a number).
fn shown_metric(value: Option<f64>, digits: usize) -> String {
    match value {
        Some(v) if v.is_finite() => format!("{v:.digits$}"),
        _ => "n/a".to_string(),
    }
}

fn score(s: &ScoreArgs) -> Result<()> {
    let mut gold = load_jsonl(&s.data)?;
    let mut preds = musique::metrics::read_predictions_jsonl(&s.predictions)?;
    if let Some(n) = s.limit {
        gold.truncate(n);
        preds.truncate(n);
    }
    let report = musique::metrics::evaluate(&gold, &preds).map_err(|e| match e {
        Error::PredictionMismatch { position, reason } => Error::PredictionFile {
            path: s.predictions.clone(),
            line: position + 1,
            reason,
        },
        other => other,
    })?;
    if let Some(out) = &s.out {
        musique::metrics::write_metrics_json(out, &report)?;
    }
    print_metrics(&report, s.out.as_deref().unwrap_or(&s.predictions))
}

/// Prints a metrics report as pretty JSON (`path` names it in a serialisation error).
fn print_metrics(report: &musique::metrics::MetricsReport, path: &Path) -> Result<()> {
    let text = serde_json::to_string_pretty(report).map_err(|source| Error::Json {
        path: path.to_path_buf(),
        source,
    })?;
    println!("{text}");
    Ok(())
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    // Inference allocates and frees large activations every layer: keep them in the heap
    // (`flowtune_lm::heap`; ~8 % of a MuSiQue eval's wall time). Training keeps activations
    // for its backward passes, so the policy gains nothing there and costs resident memory
    // (4 episodes: ~3 % slower, peak RSS 5.6 against 4.1-4.2 GB; docs/benchmarks.md).
    // Nothing above has started a thread.
    #[cfg(feature = "lm")]
    if matches!(cli.command, Command::Eval(_) | Command::Predict(_)) {
        flowtune::lm::heap::retain_freed_memory();
    }
    // `RUST_LOG=flowtune_lm=info` (for example) also prints each enabled span's busy/idle time
    // when it closes: engine calls, episodes, learner steps.
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
        .with_span_events(tracing_subscriber::fmt::format::FmtSpan::CLOSE)
        .with_writer(std::io::stderr)
        .init();
    let result = match &cli.command {
        Command::Train(t) => train(t),
        Command::Eval(c) => eval_or_predict(c, true),
        Command::Predict(c) => eval_or_predict(c, false),
        Command::Score(s) => score(s),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::FAILURE
        }
    }
}

#[cfg(test)]
mod tests {
    use super::shown_metric;

    #[test]
    fn a_missing_metric_shows_as_not_available() {
        assert_eq!(shown_metric(Some(0.25), 4), "0.2500");
        assert_eq!(shown_metric(Some(1.0), 3), "1.000");
        assert_eq!(shown_metric(None, 4), "n/a");
        assert_eq!(shown_metric(Some(f64::NAN), 3), "n/a");
    }
}
