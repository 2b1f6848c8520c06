//! Print a few synthetic MuSiQue-like records (question, paragraphs, decomposition).
//! Run: `cargo run -p musique --example synth_preview -- [N] [SEED]`
fn main() -> musique::Result<()> {
    let mut args = std::env::args().skip(1);
    let n: usize = args.next().and_then(|a| a.parse().ok()).unwrap_or(3);
    let seed: u64 = args.next().and_then(|a| a.parse().ok()).unwrap_or(0);
    let config = musique::synth::SynthConfig {
        seed,
        questions: n,
        unanswerable_twins: true,
        ..Default::default()
    };
    for r in musique::synth::generate(&config)? {
        println!(
            "{}  answerable={}  Q: {}  A: {} {:?}",
            r.id, r.answerable, r.question, r.answer, r.answer_aliases
        );
        for p in &r.paragraphs {
            println!(
                "  [{}]{} {}: {}",
                p.idx,
                if p.is_supporting { "*" } else { " " },
                p.title,
                p.paragraph_text
            );
        }
        for s in &r.question_decomposition {
            println!(
                "    {} -> {} (paragraph {:?})",
                s.question, s.answer, s.paragraph_support_idx
            );
        }
    }
    Ok(())
}
