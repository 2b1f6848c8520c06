//! Per-call scheduling overhead of the executor + credit-assignment pipeline, with a zero-cost
//! backend. Baseline measured in the same run: the same requests answered by direct
//! `run_batch` calls in batches of the same size, without flows, contexts or traces.
//!
//! Run: `cargo bench -p flowtune-rollout --bench scheduling`
#![allow(missing_docs)]
#![allow(clippy::expect_used, clippy::unwrap_used, clippy::panic)]

use std::hint::black_box;
use std::time::{Duration, Instant};

use criterion::{criterion_group, criterion_main, Criterion};
use flowtune_graph::{
    Backend, BoxError, CallSpec, Candidate, Decoding, EpisodeContext, Flow, FlowSpec, Message,
    NodeId, NodeRequest, NodeResponse, NodeSpec, Result,
};
use flowtune_rollout::{CreditConfig, EpisodeJob, NodeDeviation, Scheduler};

/// Answers instantly with a fixed one-token output (labels: the first label).
struct ZeroCost {
    requests: u64,
}

impl Backend for ZeroCost {
    fn run_batch(
        &mut self,
        requests: &[NodeRequest],
    ) -> std::result::Result<Vec<NodeResponse>, BoxError> {
        self.requests += requests.len() as u64;
        Ok(requests
            .iter()
            .map(|r| NodeResponse {
                prompt_ids: vec![1, 2, 3, 4],
                outputs: match &r.call {
                    CallSpec::Classify { labels: o } | CallSpec::Choose { candidates: o } => o
                        .iter()
                        .enumerate()
                        .map(|(i, t)| Candidate {
                            ids: vec![i as u32],
                            text: t.clone(),
                            logprob: -(i as f64),
                        })
                        .collect(),
                    CallSpec::Generate {
                        num_return_sequences,
                        ..
                    } => (0..*num_return_sequences)
                        .map(|i| Candidate {
                            ids: vec![7 + i as u32],
                            text: format!("w{i}"),
                            logprob: -(i as f64),
                        })
                        .collect(),
                },
            })
            .collect())
    }

    fn tokenize(
        &mut self,
        _node: &NodeId,
        texts: &[String],
    ) -> std::result::Result<Vec<Vec<u32>>, BoxError> {
        Ok(texts.iter().map(|_| vec![7]).collect())
    }
}

const STEPS: usize = 8;

/// Eight generate calls in a row.
struct Uniform;

impl Flow for Uniform {
    type Input = u64;
    type Output = ();

    fn spec(&self) -> FlowSpec {
        FlowSpec {
            name: "bench".into(),
            nodes: vec![NodeSpec::generate("step", 4)],
            edges: vec![],
        }
    }

    async fn run(&self, cx: &EpisodeContext, input: &u64) -> Result<()> {
        for i in 0..STEPS {
            cx.generate("step", vec![Message::user(format!("{input} {i}"))])
                .await?;
        }
        cx.reward("reward", 0.0);
        Ok(())
    }
}

fn no_deviation() -> CreditConfig {
    CreditConfig {
        default_deviation: NodeDeviation {
            enabled: false,
            ..NodeDeviation::default()
        },
        ..CreditConfig::default()
    }
}

fn scheduled(episodes: usize, credit: CreditConfig) -> (Duration, u64) {
    let inputs: Vec<u64> = (0..episodes as u64).collect();
    let jobs: Vec<EpisodeJob<'_, u64>> = inputs
        .iter()
        .map(|i| EpisodeJob {
            episode: *i,
            seed: *i,
            input: i,
        })
        .collect();
    let mut scheduler = Scheduler::new(&Uniform, credit, episodes).expect("scheduler");
    let mut backend = ZeroCost { requests: 0 };
    let start = Instant::now();
    let out = scheduler.run(&jobs, &mut backend, None).expect("run");
    let elapsed = start.elapsed();
    black_box(out);
    (elapsed, backend.requests)
}

fn direct(episodes: usize) -> Duration {
    let mut backend = ZeroCost { requests: 0 };
    let start = Instant::now();
    for step in 0..STEPS {
        let batch: Vec<NodeRequest> = (0..episodes)
            .map(|e| NodeRequest {
                node: NodeId::from("step"),
                adapter: Some("step".into()),
                messages: vec![Message::user(format!("{e} {step}"))],
                call: CallSpec::Generate {
                    max_new_tokens: 4,
                    decoding: Decoding::Greedy,
                    num_return_sequences: 1,
                    stop: vec![],
                },
            })
            .collect();
        black_box(backend.run_batch(&batch).expect("batch"));
    }
    start.elapsed()
}

fn bench(c: &mut Criterion) {
    let episodes = 64;
    let mut group = c.benchmark_group("scheduling");
    group.bench_function("direct_run_batch_64x8", |b| b.iter(|| direct(episodes)));
    group.bench_function("scheduled_64_episodes_x8_calls", |b| {
        b.iter(|| scheduled(episodes, no_deviation()))
    });
    group.finish();

    // Ratio printout (per call), medians of repeated runs measured here, in the same process.
    let median = |mut v: Vec<f64>| {
        v.sort_by(f64::total_cmp);
        v[v.len() / 2]
    };
    let reps = 200;
    let calls = (episodes * STEPS) as f64;
    let base = median(
        (0..reps)
            .map(|_| direct(episodes).as_secs_f64() / calls)
            .collect(),
    );
    let sched = median(
        (0..reps)
            .map(|_| scheduled(episodes, no_deviation()).0.as_secs_f64() / calls)
            .collect(),
    );
    let (_, dev_calls) = scheduled(episodes, CreditConfig::default());
    let dev = median(
        (0..reps / 4)
            .map(|_| {
                let (t, n) = scheduled(episodes, CreditConfig::default());
                t.as_secs_f64() / n as f64
            })
            .collect(),
    );
    println!(
        "per call: direct run_batch {:.0} ns, scheduled {:.0} ns (ratio {:.2}, overhead {:.0} ns/call); \
         with one-step deviations at every call ({dev_calls} calls) {:.0} ns/call (ratio {:.2})",
        base * 1e9,
        sched * 1e9,
        sched / base,
        (sched - base) * 1e9,
        dev * 1e9,
        dev / base
    );
}

criterion_group! {
    name = benches;
    config = Criterion::default().sample_size(20).warm_up_time(Duration::from_millis(500)).measurement_time(Duration::from_secs(3));
    targets = bench
}
criterion_main!(benches);
