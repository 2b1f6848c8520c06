//! The scheduler: many episodes and all their rollouts in flight against one backend.
use std::rc::Rc;

use serde::{Deserialize, Serialize};

use flowtune_graph::{Backend, BatchStats, Executor, Flow, NodeTable, Trace};

use crate::config::CreditConfig;
use crate::credit::{
    account, build_feedback, run_with_credit, Accounting, CreditSetup, EpisodeJudge, EpisodeRun,
    Rollout,
};
use crate::error::{Error, Result};
use crate::feedback::Feedback;

type Task<O> = (usize, Result<EpisodeRun<O>>);

fn spawn_job<'x, F: Flow>(
    executor: &mut Executor<'x, Task<F::Output>>,
    flow: &'x F,
    setup: &'x CreditSetup,
    jobs: &'x [EpisodeJob<'x, F::Input>],
    i: usize,
) {
    let job = &jobs[i];
    let dispatcher = executor.dispatcher();
    executor.spawn(async move {
        (
            i,
            run_with_credit(flow, job.input, setup, job.episode, job.seed, dispatcher).await,
        )
    });
}

/// One episode to run.
#[derive(Debug, Clone, Copy)]
pub struct EpisodeJob<'i, I> {
    /// The episode id.
    pub episode: u64,
    /// Its seed.
    pub seed: u64,
    /// The record.
    pub input: &'i I,
}

/// A finished episode with its rollouts and feedback.
#[derive(Debug, Clone)]
pub struct EpisodeResult<O> {
    /// The episode id.
    pub episode: u64,
    /// The flow's output.
    pub output: Option<O>,
    /// The live episode's trace.
    pub trace: Rc<Trace>,
    /// Its rollouts.
    pub rollouts: Vec<Rollout>,
    /// Feedback for the learners.
    pub feedback: Vec<Feedback>,
    /// Work done.
    pub accounting: Accounting,
}

/// An episode that failed, with the error's message: flow code, a replay divergence in one of
/// its rollouts, or its feedback. Backend errors are shared by the episodes of a batch and
/// still end the whole run.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct EpisodeFailure {
    /// The episode id.
    pub episode: u64,
    /// What went wrong.
    pub error: String,
}

/// What became of one episode of [`Scheduler::run_isolated`].
pub type EpisodeOutcome<O> = std::result::Result<EpisodeResult<O>, EpisodeFailure>;

/// The backend usage of one scheduler run.
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize, Deserialize)]
pub struct ScheduleStats {
    /// Batches and requests.
    pub batch: BatchStats,
}

/// Runs episodes with credit assignment, keeping up to `in_flight` episodes (each with its
/// rollouts) in flight so node calls reach the backend batched.
pub struct Scheduler<'f, F: Flow> {
    flow: &'f F,
    setup: CreditSetup,
    in_flight: usize,
}

impl<'f, F: Flow> Scheduler<'f, F> {
    /// A scheduler for `flow`.
    pub fn new(flow: &'f F, credit: CreditConfig, in_flight: usize) -> Result<Self> {
        if in_flight == 0 {
            return Err(Error::Config {
                field: "episodes_in_flight",
                reason: "must be at least 1".into(),
            });
        }
        let nodes = Rc::new(NodeTable::new(&flow.spec())?);
        Ok(Scheduler {
            flow,
            setup: CreditSetup {
                nodes,
                config: credit,
                judged: false,
            },
            in_flight,
        })
    }

    /// The flow's node table.
    pub fn nodes(&self) -> &Rc<NodeTable> {
        &self.setup.nodes
    }

    /// Runs `jobs`; results come back in job order, with the backend usage of the run. The first
    /// error of any episode ends the run (see [`Scheduler::run_isolated`] to keep going).
    pub fn run(
        &mut self,
        jobs: &[EpisodeJob<'_, F::Input>],
        backend: &mut dyn Backend,
        judge: Option<&mut dyn EpisodeJudge>,
    ) -> Result<(Vec<EpisodeResult<F::Output>>, BatchStats)> {
        // Without isolation the first error has already been returned as it was raised, so
        // no outcome is a failure here; the conversion only unwraps the type.
        let (outcomes, batch) = self.run_jobs(jobs, backend, judge, false)?;
        let results = outcomes
            .into_iter()
            .map(|o| {
                o.map_err(|f| Error::EpisodeFailed {
                    episode: f.episode,
                    message: f.error,
                })
            })
            .collect::<Result<_>>()?;
        Ok((results, batch))
    }

    /// Runs `jobs` like [`Scheduler::run`], but an episode whose flow code, rollouts or feedback
    /// fail becomes an [`EpisodeFailure`] and the others go on. Backend errors still end the
    /// run. Outcomes come back in job order.
    pub fn run_isolated(
        &mut self,
        jobs: &[EpisodeJob<'_, F::Input>],
        backend: &mut dyn Backend,
        judge: Option<&mut dyn EpisodeJudge>,
    ) -> Result<(Vec<EpisodeOutcome<F::Output>>, BatchStats)> {
        self.run_jobs(jobs, backend, judge, true)
    }

    fn run_jobs(
        &mut self,
        jobs: &[EpisodeJob<'_, F::Input>],
        backend: &mut dyn Backend,
        judge: Option<&mut dyn EpisodeJudge>,
        isolate: bool,
    ) -> Result<(Vec<EpisodeOutcome<F::Output>>, BatchStats)> {
        let _span = tracing::info_span!("rollouts", episodes = jobs.len()).entered();
        self.setup.judged = judge.is_some();
        let setup = &self.setup;
        let flow = self.flow;
        let fail = |job: &EpisodeJob<'_, F::Input>, e: Error| -> Result<EpisodeFailure> {
            if !isolate {
                return Err(e);
            }
            tracing::warn!(episode = job.episode, error = %e, "episode failed");
            Ok(EpisodeFailure {
                episode: job.episode,
                error: e.to_string(),
            })
        };
        let mut runs: Vec<Option<std::result::Result<EpisodeRun<F::Output>, EpisodeFailure>>> =
            jobs.iter().map(|_| None).collect();
        let batch = {
            let mut executor = Executor::new();
            let mut next = 0;
            while next < jobs.len() && next < self.in_flight {
                spawn_job(&mut executor, flow, setup, jobs, next);
                next += 1;
            }
            while !executor.is_empty() {
                for (_, (i, run)) in executor.step(backend)? {
                    runs[i] = Some(match run {
                        Ok(run) => Ok(run),
                        Err(e) => Err(fail(&jobs[i], e)?),
                    });
                    if next < jobs.len() {
                        spawn_job(&mut executor, flow, setup, jobs, next);
                        next += 1;
                    }
                }
            }
            executor.stats()
        };
        let mut judge = judge;
        let mut outcomes = Vec::with_capacity(jobs.len());
        for (job, run) in jobs.iter().zip(runs) {
            let run = match run {
                Some(Ok(run)) => run,
                Some(Err(failure)) => {
                    outcomes.push(Err(failure));
                    continue;
                }
                None => return Err(Error::Graph(flowtune_graph::Error::Stalled { tasks: 1 })),
            };
            let mut accounting = account(&run);
            let feedback = match build_feedback(
                &run,
                &setup.config,
                crate::online::reborrow(&mut judge),
                backend,
                &mut accounting,
            ) {
                Ok(f) => f,
                Err(e) => {
                    outcomes.push(Err(fail(job, e)?));
                    continue;
                }
            };
            outcomes.push(Ok(EpisodeResult {
                episode: job.episode,
                output: run.output,
                trace: run.trace,
                rollouts: run.rollouts,
                feedback,
                accounting,
            }));
        }
        Ok((outcomes, batch))
    }
}
