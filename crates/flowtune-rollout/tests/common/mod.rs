//! Toy flows for the rollout tests.
#![allow(dead_code)]
use flowtune_graph::{EpisodeContext, Flow, FlowSpec, Message, NodeSpec, Result};

/// Rewards of node B's labels; the episode reward depends on B only.
pub const B_REWARD: [f64; 3] = [0.1, 0.5, 0.9];

/// A → B → C; reward = B_REWARD[B]. Supplies gold: label 2 for B, target "c1" for C.
pub struct AbcFlow;

impl Flow for AbcFlow {
    type Input = String;
    type Output = String;

    fn spec(&self) -> FlowSpec {
        FlowSpec {
            name: "abc".into(),
            nodes: vec![
                NodeSpec::classify("A", &["a0", "a1"]),
                NodeSpec::classify("B", &["b0", "b1", "b2"]),
                NodeSpec::choose("C"),
            ],
            edges: vec![],
        }
    }

    async fn run(&self, cx: &EpisodeContext, input: &String) -> Result<String> {
        let a = cx
            .classify("A", vec![Message::user(format!("start {input}"))])
            .await?;
        let b = cx
            .classify("B", vec![Message::user(format!("after {}", a.text()))])
            .await?;
        cx.gold_label(&b, 2);
        let c = cx
            .choose(
                "C",
                vec![Message::user(format!("after {}", b.text()))],
                vec!["c0".into(), "c1".into()],
            )
            .await?;
        cx.gold_target(&c, "c1");
        cx.reward("reward", B_REWARD[b.choice()]);
        Ok(format!("{} {} {}", a.text(), b.text(), c.text()))
    }
}

/// Retrieval R (reward `support` known right after it), then three generate steps and `answer`.
pub struct RetrieveThenAnswer;

impl Flow for RetrieveThenAnswer {
    type Input = String;
    type Output = String;

    fn spec(&self) -> FlowSpec {
        FlowSpec {
            name: "ret".into(),
            nodes: vec![
                NodeSpec::classify("R", &["r0", "r1"]),
                NodeSpec::generate("G", 8),
            ],
            edges: vec![],
        }
    }

    async fn run(&self, cx: &EpisodeContext, input: &String) -> Result<String> {
        let r = cx.classify("R", vec![Message::user(input.clone())]).await?;
        cx.reward("support", if r.choice() == 1 { 1.0 } else { 0.0 });
        let mut text = r.text().to_owned();
        for i in 0..3 {
            let g = cx
                .generate("G", vec![Message::user(format!("{text} {i}"))])
                .await?;
            text.push_str(g.text());
        }
        cx.reward("answer", text.len() as f64);
        Ok(text)
    }
}

/// Two chained choices whose best pair depends on the context (see [`two_step_reward`]).
pub struct TwoStepFlow;

/// c0: (x,p)=0, (x,q)=0.3, (y,p)=1, (y,q)=0.2; c1: (x,p)=0.5, (x,q)=1, (y,·)=0.
pub fn two_step_reward(context: &str, first: &str, second: &str) -> f64 {
    match (context, first, second) {
        ("c0", "x", "q") => 0.3,
        ("c0", "y", "p") => 1.0,
        ("c0", "y", "q") => 0.2,
        ("c1", "x", "p") => 0.5,
        ("c1", "x", "q") => 1.0,
        _ => 0.0,
    }
}

impl Flow for TwoStepFlow {
    type Input = String;
    type Output = f64;

    fn spec(&self) -> FlowSpec {
        FlowSpec {
            name: "two".into(),
            nodes: vec![
                NodeSpec::classify("first", &["x", "y"]),
                NodeSpec::classify("second", &["p", "q"]),
            ],
            edges: vec![],
        }
    }

    async fn run(&self, cx: &EpisodeContext, context: &String) -> Result<f64> {
        let first = cx
            .classify("first", vec![Message::user(context.clone())])
            .await?;
        let second = cx
            .classify(
                "second",
                vec![Message::user(format!("{context} {}", first.text()))],
            )
            .await?;
        let r = two_step_reward(context, first.text(), second.text());
        cx.reward("reward", r);
        Ok(r)
    }
}

/// Five generate calls in a row: every episode has the same shape.
pub struct UniformFlow;

impl Flow for UniformFlow {
    type Input = String;
    type Output = ();

    fn spec(&self) -> FlowSpec {
        FlowSpec {
            name: "uniform".into(),
            nodes: vec![NodeSpec::generate("step", 4)],
            edges: vec![],
        }
    }

    async fn run(&self, cx: &EpisodeContext, input: &String) -> Result<()> {
        let mut text = input.clone();
        for _ in 0..5 {
            text = cx
                .generate("step", vec![Message::user(text)])
                .await?
                .text()
                .to_owned();
        }
        cx.reward("reward", if text == "w1" { 1.0 } else { 0.0 });
        Ok(())
    }
}
