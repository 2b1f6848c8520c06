//! The `musique` command-line tool.
fn main() {
    println!("usage: musique <train|eval|predict> [--model PATH] [--data IN.jsonl] [--out DIR]");
    println!("(the MuSiQue flows are being built; see issue 7)");
}
