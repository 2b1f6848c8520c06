//! Properties of the learner's prefix grouping of label prompts (no model needed).
#![allow(clippy::unwrap_used, clippy::expect_used)]

use flowtune::learner::{prefix_groups, PrefixGroup};
use proptest::prelude::*;

fn check_invariants(prompts: &[Vec<u32>], groups: &[PrefixGroup]) {
    let mut seen = vec![0usize; prompts.len()];
    for g in groups {
        assert!(!g.members.is_empty(), "empty group");
        let first = &prompts[g.members[0]];
        for &m in &g.members {
            seen[m] += 1;
            let p = &prompts[m];
            assert!(
                p.len() > g.prefix_len || (p.len() <= 1 && g.prefix_len == 0),
                "member {m} of length {} not longer than prefix {}",
                p.len(),
                g.prefix_len
            );
            assert_eq!(
                &p[..g.prefix_len],
                &first[..g.prefix_len],
                "prefix not shared by {m}"
            );
        }
    }
    assert!(
        seen.iter().all(|&c| c == 1),
        "each prompt in exactly one group: {seen:?}"
    );
}

proptest! {
    /// Every prompt lands in exactly one group, each group's prefix is common to its members,
    /// and each member keeps at least one token of its own.
    #[test]
    fn groups_partition_prompts_and_share_their_prefix(
        prompts in prop::collection::vec(prop::collection::vec(0u32..4, 1..12), 0..24)
    ) {
        let refs: Vec<&[u32]> = prompts.iter().map(|p| p.as_slice()).collect();
        let groups = prefix_groups(&refs);
        check_invariants(&prompts, &groups);
        // Grouping never runs more tokens than running every prompt whole.
        let grouped: usize = groups
            .iter()
            .map(|g| g.prefix_len + g.members.iter().map(|&m| prompts[m].len() - g.prefix_len).sum::<usize>())
            .sum();
        let whole: usize = prompts.iter().map(|p| p.len()).sum();
        prop_assert!(grouped <= whole);
    }
}

/// The MuSiQue relevance shape: a common system prompt, then a paragraph, then a question
/// and a query that changes each loop. Records of one paragraph group together; different
/// paragraphs do not merge over the short system prompt.
#[test]
fn paragraphs_scored_under_several_queries_group_by_paragraph() {
    let system: Vec<u32> = (1000..1010).collect();
    let para = |p: u32| -> Vec<u32> { (0..60).map(|i| 2000 + p * 100 + i).collect() };
    let query = |q: u32| -> Vec<u32> { vec![3000, 3001 + q, 3002 + q, 3003] };
    let mut prompts = Vec::new();
    for q in 0..3 {
        for p in 0..4 {
            if q == 2 && p == 3 {
                continue; // retrieved after loop 2: not scored again
            }
            let mut v = system.clone();
            v.extend(para(p));
            v.extend(query(q * 10));
            prompts.push(v);
        }
    }
    let refs: Vec<&[u32]> = prompts.iter().map(|p| p.as_slice()).collect();
    let groups = prefix_groups(&refs);
    check_invariants(&prompts, &groups);
    let mut sizes: Vec<usize> = groups.iter().map(|g| g.members.len()).collect();
    sizes.sort_unstable();
    assert_eq!(sizes, vec![2, 3, 3, 3], "{groups:?}");
    for g in &groups {
        assert_eq!(g.prefix_len, system.len() + 60 + 1, "{g:?}");
    }
}

/// A growing scratchpad: each prompt extends the previous one's body; they share the body.
#[test]
fn growing_prompts_share_the_shortest_body() {
    let body: Vec<u32> = (0..50).collect();
    let prompts: Vec<Vec<u32>> = (0..3)
        .map(|k| {
            let mut v = body.clone();
            v.extend((0..10 * k).map(|i| 500 + i));
            v.extend([900, 901]);
            v
        })
        .collect();
    let refs: Vec<&[u32]> = prompts.iter().map(|p| p.as_slice()).collect();
    let groups = prefix_groups(&refs);
    check_invariants(&prompts, &groups);
    assert_eq!(groups.len(), 1, "{groups:?}");
    assert_eq!(groups[0].prefix_len, 50);
}

/// The learner config round-trips through JSON, and a config saved before `label_sharing` and
/// `dpo_dropout` existed (learner.json of an older checkpoint) loads with their defaults.
#[test]
fn learner_config_round_trips_and_defaults_new_fields() {
    use flowtune::learner::{LabelSharing, LearnerConfig};
    let config = LearnerConfig {
        label_sharing: LabelSharing::Unshared,
        micro_batch: 3,
        dpo_dropout: true,
        recorded_backward: false,
        ..LearnerConfig::default()
    };
    let json = serde_json::to_value(config).unwrap();
    assert_eq!(
        serde_json::from_value::<LearnerConfig>(json.clone()).unwrap(),
        config
    );
    let mut old = json;
    old.as_object_mut().unwrap().remove("label_sharing");
    old.as_object_mut().unwrap().remove("dpo_dropout");
    old.as_object_mut().unwrap().remove("recorded_backward");
    let loaded: LearnerConfig = serde_json::from_value(old).unwrap();
    assert_eq!(loaded.label_sharing, LabelSharing::PrefixGroups);
    assert!(!loaded.dpo_dropout);
    assert!(loaded.recorded_backward);
    assert_eq!(loaded.micro_batch, 3);
}
