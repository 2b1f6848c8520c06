//! A small deterministic single-threaded executor that batches node requests.
//!
//! Every task (an episode, a rollout, a whole credit-assignment pipeline) is polled until it is
//! waiting on node requests or done; then all requests in flight go to the backend as ONE batch,
//! the responses are delivered, and only the tasks that received one are polled again. Polling
//! order is task-id order, so a run is a deterministic function of its inputs.
use std::cell::RefCell;
use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::future::Future;
use std::pin::Pin;
use std::rc::Rc;
use std::task::{Context, Poll, Waker};

use serde::{Deserialize, Serialize};

use crate::backend::{Backend, NodeRequest, NodeResponse};
use crate::error::{Error, Result};

/// Identifies a task spawned on an [`Executor`].
pub type TaskId = u64;

struct PendingRequest {
    ticket: u64,
    task: TaskId,
    request: NodeRequest,
}

#[derive(Default)]
struct Queue {
    next_ticket: u64,
    current_task: Option<TaskId>,
    pending: Vec<PendingRequest>,
    responses: HashMap<u64, NodeResponse>,
}

/// A handle through which futures submit node requests to the executor that polls them.
#[derive(Clone, Default)]
pub struct Dispatcher {
    queue: Rc<RefCell<Queue>>,
}

impl Dispatcher {
    /// A future resolving to the backend's response to `request`, sent with the next batch.
    pub fn request(&self, request: NodeRequest) -> RequestFuture {
        RequestFuture {
            queue: self.queue.clone(),
            state: RequestState::Unsent(Some(request)),
        }
    }
}

enum RequestState {
    Unsent(Option<NodeRequest>),
    Waiting(u64),
    Done,
}

/// A node request waiting for its batch (see [`Dispatcher::request`]). Dropping it withdraws
/// the request if it has not been sent yet.
pub struct RequestFuture {
    queue: Rc<RefCell<Queue>>,
    state: RequestState,
}

impl Future for RequestFuture {
    type Output = NodeResponse;

    fn poll(mut self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<NodeResponse> {
        let this = &mut *self;
        let mut queue = this.queue.borrow_mut();
        match &mut this.state {
            RequestState::Unsent(request) => {
                if let Some(request) = request.take() {
                    let ticket = queue.next_ticket;
                    queue.next_ticket += 1;
                    // Outside an executor there is no task to wake: the request stays queued and
                    // `Executor::step` reports a stall instead of hanging.
                    let task = queue.current_task.unwrap_or(TaskId::MAX);
                    queue.pending.push(PendingRequest {
                        ticket,
                        task,
                        request,
                    });
                    this.state = RequestState::Waiting(ticket);
                }
                Poll::Pending
            }
            RequestState::Waiting(ticket) => match queue.responses.remove(ticket) {
                Some(response) => {
                    this.state = RequestState::Done;
                    Poll::Ready(response)
                }
                None => Poll::Pending,
            },
            RequestState::Done => Poll::Pending,
        }
    }
}

impl Drop for RequestFuture {
    fn drop(&mut self) {
        if let RequestState::Waiting(ticket) = self.state {
            if let Ok(mut queue) = self.queue.try_borrow_mut() {
                queue.pending.retain(|p| p.ticket != ticket);
                queue.responses.remove(&ticket);
            }
        }
    }
}

/// How the backend was used: batches sent and requests in them.
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize, Deserialize)]
pub struct BatchStats {
    /// Batches sent.
    pub batches: u64,
    /// Requests sent, over all batches.
    pub requests: u64,
    /// The largest batch.
    pub max_batch: u64,
}

impl BatchStats {
    /// The average batch size the backend saw (0 before any batch).
    pub fn mean_batch_size(&self) -> f64 {
        if self.batches == 0 {
            0.0
        } else {
            self.requests as f64 / self.batches as f64
        }
    }

    /// Adds another run's counts.
    pub fn merge(&mut self, other: &BatchStats) {
        self.batches += other.batches;
        self.requests += other.requests;
        self.max_batch = self.max_batch.max(other.max_batch);
    }
}

type Task<'a, T> = Pin<Box<dyn Future<Output = T> + 'a>>;

/// The batching executor.
pub struct Executor<'a, T> {
    dispatcher: Dispatcher,
    tasks: BTreeMap<TaskId, Task<'a, T>>,
    to_poll: BTreeSet<TaskId>,
    next_task: TaskId,
    stats: BatchStats,
}

impl<'a, T> Default for Executor<'a, T> {
    fn default() -> Self {
        Self::new()
    }
}

impl<'a, T> Executor<'a, T> {
    /// An empty executor.
    pub fn new() -> Self {
        Executor {
            dispatcher: Dispatcher::default(),
            tasks: BTreeMap::new(),
            to_poll: BTreeSet::new(),
            next_task: 0,
            stats: BatchStats::default(),
        }
    }

    /// The dispatcher futures on this executor must send their requests through.
    pub fn dispatcher(&self) -> Dispatcher {
        self.dispatcher.clone()
    }

    /// Adds a task; it is first polled by the next [`step`](Self::step).
    pub fn spawn(&mut self, task: impl Future<Output = T> + 'a) -> TaskId {
        let id = self.next_task;
        self.next_task += 1;
        self.tasks.insert(id, Box::pin(task));
        self.to_poll.insert(id);
        id
    }

    /// Tasks not yet finished.
    pub fn len(&self) -> usize {
        self.tasks.len()
    }

    /// Whether every task has finished.
    pub fn is_empty(&self) -> bool {
        self.tasks.is_empty()
    }

    /// Backend usage so far.
    pub fn stats(&self) -> BatchStats {
        self.stats
    }

    /// Polls every task that can progress. If some finished, returns them (without calling the
    /// backend, so the caller can spawn follow-up tasks that join the next batch). Otherwise sends
    /// all queued requests to `backend` as one batch, delivers the responses and returns nothing.
    pub fn step(&mut self, backend: &mut dyn Backend) -> Result<Vec<(TaskId, T)>> {
        let mut finished = Vec::new();
        let waker = Waker::noop();
        let mut cx = Context::from_waker(waker);
        for id in std::mem::take(&mut self.to_poll) {
            let Some(task) = self.tasks.get_mut(&id) else {
                continue;
            };
            self.dispatcher.queue.borrow_mut().current_task = Some(id);
            let poll = task.as_mut().poll(&mut cx);
            self.dispatcher.queue.borrow_mut().current_task = None;
            if let Poll::Ready(value) = poll {
                self.tasks.remove(&id);
                finished.push((id, value));
            }
        }
        if !finished.is_empty() || self.tasks.is_empty() {
            return Ok(finished);
        }
        let pending = std::mem::take(&mut self.dispatcher.queue.borrow_mut().pending);
        if pending.is_empty() {
            return Err(Error::Stalled {
                tasks: self.tasks.len(),
            });
        }
        let mut tickets = Vec::with_capacity(pending.len());
        let mut requests = Vec::with_capacity(pending.len());
        for p in pending {
            tickets.push((p.ticket, p.task));
            requests.push(p.request);
        }
        let _span = tracing::trace_span!("engine_step", batch = requests.len()).entered();
        let responses = backend
            .run_batch(&requests)
            .map_err(|source| Error::Backend {
                batch_size: requests.len(),
                source,
            })?;
        if responses.len() != requests.len() {
            return Err(Error::BackendResponseCount {
                expected: requests.len(),
                got: responses.len(),
            });
        }
        let n = requests.len() as u64;
        self.stats.batches += 1;
        self.stats.requests += n;
        self.stats.max_batch = self.stats.max_batch.max(n);
        let mut queue = self.dispatcher.queue.borrow_mut();
        for ((ticket, task), response) in tickets.into_iter().zip(responses) {
            if task == TaskId::MAX {
                continue;
            }
            queue.responses.insert(ticket, response);
            self.to_poll.insert(task);
        }
        Ok(Vec::new())
    }

    /// Runs until every task has finished; returns their values in completion order.
    pub fn run(&mut self, backend: &mut dyn Backend) -> Result<Vec<(TaskId, T)>> {
        let mut all = Vec::new();
        while !self.is_empty() {
            all.extend(self.step(backend)?);
        }
        Ok(all)
    }
}

/// Runs a set of futures concurrently (within one task); resolves to their outputs in order.
pub fn join_all<F: Future>(futures: impl IntoIterator<Item = F>) -> JoinAll<F> {
    let futures: Vec<_> = futures.into_iter().map(|f| Some(Box::pin(f))).collect();
    let outputs = futures.iter().map(|_| None).collect();
    JoinAll { futures, outputs }
}

/// The future returned by [`join_all`].
pub struct JoinAll<F: Future> {
    futures: Vec<Option<Pin<Box<F>>>>,
    outputs: Vec<Option<F::Output>>,
}

impl<F: Future> Unpin for JoinAll<F> {}

impl<F: Future> Future for JoinAll<F> {
    type Output = Vec<F::Output>;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = &mut *self;
        let mut all_done = true;
        for (slot, out) in this.futures.iter_mut().zip(this.outputs.iter_mut()) {
            if let Some(fut) = slot {
                match fut.as_mut().poll(cx) {
                    Poll::Ready(v) => {
                        *out = Some(v);
                        *slot = None;
                    }
                    Poll::Pending => all_done = false,
                }
            }
        }
        if all_done {
            Poll::Ready(this.outputs.iter_mut().filter_map(Option::take).collect())
        } else {
            Poll::Pending
        }
    }
}
