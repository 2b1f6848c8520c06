//! `flowtune-lm`: inspect and run models (GGUF file or HF folder).
//!
//! - `logits`: prompt ids and last-position logits per input line (safetensors).
//! - `generate`: greedy / sampling / beam / diverse beam generations (JSONL).
//! - `score`: completion log-probs (`"completion"`) or label choice (`"labels"`) (JSONL).
//!
//! Input: JSONL, one object per line with `"id"` and `"messages"` (`[{"role","content"}]`);
//! prompts are the chat template applied with the generation prompt.
use std::io::{BufRead, Write};
use std::path::{Path, PathBuf};

use clap::{Parser, Subcommand, ValueEnum};
use flowtune_lm::engine::{
    ClassifyRequest, Decoding, Engine, EngineConfig, GenerateRequest, GenerationParams,
    ScoreRequest,
};
use flowtune_lm::loader::{load, LinearWeights, LoadOptions};
use flowtune_lm::tokenizer::ChatMessage;
use tch::{Device, Kind, Tensor};

/// The bank name the `--adapter` folder is loaded under.
const ADAPTER_NAME: &str = "adapter";

type CliResult<T> = std::result::Result<T, Box<dyn std::error::Error>>;

#[derive(Parser)]
#[command(
    name = "flowtune-lm",
    about = "Inspect and run Llama-family models (GGUF or HF folder)"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Clone, Copy, ValueEnum)]
enum DType {
    F32,
    Bf16,
    F16,
}

#[derive(Clone, Copy, ValueEnum)]
enum DeviceArg {
    Cpu,
    Cuda,
}

#[derive(clap::Args)]
struct Common {
    /// A `.gguf` file or an HF folder.
    #[arg(long)]
    model: PathBuf,
    /// A PEFT adapter folder, used by every input line that names no adapter.
    #[arg(long)]
    adapter: Option<PathBuf>,
    /// Named PEFT adapter folders (`NAME=DIR`, repeatable); an input line selects one with
    /// `"adapter": "NAME"`, so one batch can mix adapters.
    #[arg(long = "adapters", value_name = "NAME=DIR")]
    named_adapters: Vec<String>,
    /// Weight/activation dtype.
    #[arg(long, value_enum, default_value = "f32")]
    dtype: DType,
    /// Device.
    #[arg(long, value_enum, default_value = "cpu")]
    device: DeviceArg,
    /// Decoder linear weights: `dense`, or `int4` (4-bit group-wise codes for small-batch
    /// decoding on the CPU: bf16/f16, or f32 on AVX-512 CPUs; a Q4_0/Q4_1 GGUF keeps its own blocks).
    #[arg(long, default_value = "dense")]
    weights: LinearWeights,
    /// Input JSONL.
    #[arg(long)]
    input: PathBuf,
    /// Output file.
    #[arg(long)]
    output: PathBuf,
}

#[derive(Subcommand)]
enum Command {
    /// Prompt ids and last-position logits (safetensors: `ids.{i}`, `logits.{i}`).
    Logits {
        #[command(flatten)]
        common: Common,
    },
    /// Generate (greedy by default).
    Generate {
        #[command(flatten)]
        common: Common,
        /// Maximum new tokens.
        #[arg(long, default_value_t = 64)]
        max_new_tokens: usize,
        /// Sample instead of greedy.
        #[arg(long)]
        do_sample: bool,
        /// Sampling temperature.
        #[arg(long, default_value_t = 1.0)]
        temperature: f64,
        /// Top-p (nucleus) mass.
        #[arg(long, default_value_t = 1.0)]
        top_p: f64,
        /// Top-k (0 = off).
        #[arg(long, default_value_t = 0)]
        top_k: usize,
        /// Sampling seed.
        #[arg(long, default_value_t = 0)]
        seed: u64,
        /// Beams (> 1 = beam search).
        #[arg(long, default_value_t = 1)]
        num_beams: usize,
        /// Beam groups (diverse beam search when > 1).
        #[arg(long, default_value_t = 1)]
        num_beam_groups: usize,
        /// Diversity penalty between beam groups.
        #[arg(long, default_value_t = 0.0)]
        diversity_penalty: f64,
        /// Length penalty for beam search.
        #[arg(long, default_value_t = 1.0)]
        length_penalty: f64,
        /// Sequences returned per input.
        #[arg(long, default_value_t = 1)]
        num_return_sequences: usize,
        /// Stop strings (repeatable).
        #[arg(long)]
        stop: Vec<String>,
    },
    /// Completion log-probs (lines with `"completion"`) or label choice (lines with `"labels"`).
    Score {
        #[command(flatten)]
        common: Common,
    },
}

#[derive(serde::Deserialize)]
struct InputLine {
    id: serde_json::Value,
    messages: Vec<ChatMessage>,
    #[serde(default)]
    completion: Option<String>,
    #[serde(default)]
    labels: Option<Vec<String>>,
    /// The named adapter (`--adapters NAME=DIR`) for this line.
    #[serde(default)]
    adapter: Option<String>,
}

fn read_input(path: &Path) -> CliResult<Vec<InputLine>> {
    let f = std::fs::File::open(path).map_err(|e| format!("{}: {e}", path.display()))?;
    let mut out = Vec::new();
    for (n, line) in std::io::BufReader::new(f).lines().enumerate() {
        let line = line.map_err(|e| format!("{}: {e}", path.display()))?;
        if line.trim().is_empty() {
            continue;
        }
        let v: InputLine = serde_json::from_str(&line)
            .map_err(|e| format!("{} line {}: {e}", path.display(), n + 1))?;
        out.push(v);
    }
    Ok(out)
}

/// Write via a temp file in the same folder, then rename.
fn write_atomic(path: &Path, write: impl FnOnce(&Path) -> CliResult<()>) -> CliResult<()> {
    let dir = path
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().to_string())
        .unwrap_or_else(|| "out".into());
    let tmp = dir.join(format!(".{name}.tmp{}", std::process::id()));
    write(&tmp)?;
    std::fs::rename(&tmp, path).map_err(|e| format!("{}: {e}", path.display()))?;
    Ok(())
}

fn engine(c: &Common) -> CliResult<Engine> {
    let dtype = match c.dtype {
        DType::F32 => Kind::Float,
        DType::Bf16 => Kind::BFloat16,
        DType::F16 => Kind::Half,
    };
    let device = match c.device {
        DeviceArg::Cpu => Device::Cpu,
        DeviceArg::Cuda => Device::Cuda(0),
    };
    let loaded = load(
        &c.model,
        &LoadOptions {
            device,
            dtype,
            linear_weights: c.weights,
        },
    )?;
    let mut engine = Engine::new(loaded, EngineConfig::default())?;
    if let Some(dir) = &c.adapter {
        engine.load_adapter(ADAPTER_NAME, dir)?;
    }
    for spec in &c.named_adapters {
        let (name, dir) = spec
            .split_once('=')
            .ok_or_else(|| format!("--adapters {spec:?}: expected NAME=DIR"))?;
        engine.load_adapter(name, Path::new(dir))?;
    }
    Ok(engine)
}

fn write_jsonl(path: &Path, lines: &[serde_json::Value]) -> CliResult<()> {
    write_atomic(path, |tmp| {
        let mut f = std::io::BufWriter::new(
            std::fs::File::create(tmp).map_err(|e| format!("{}: {e}", tmp.display()))?,
        );
        for l in lines {
            writeln!(f, "{}", serde_json::to_string(l)?)?;
        }
        f.flush()?;
        Ok(())
    })
}

fn run() -> CliResult<()> {
    let cli = Cli::parse();
    match cli.command {
        Command::Logits { common } => {
            let e = engine(&common)?;
            let default_adapter = common.adapter.as_ref().map(|_| ADAPTER_NAME.to_string());
            let input = read_input(&common.input)?;
            let mut tensors: Vec<(String, Tensor)> = Vec::new();
            for (i, line) in input.iter().enumerate() {
                let prompt = e.tokenizer().encode_chat(&line.messages, true)?;
                let logits = e.last_logits(
                    &prompt,
                    line.adapter.as_deref().or(default_adapter.as_deref()),
                )?;
                let ids: Vec<i64> = prompt.iter().map(|&x| x as i64).collect();
                tensors.push((format!("ids.{i}"), Tensor::f_from_slice(&ids)?));
                tensors.push((
                    format!("logits.{i}"),
                    logits
                        .f_to_kind(Kind::Float)?
                        .f_to(Device::Cpu)?
                        .f_contiguous()?,
                ));
            }
            write_atomic(&common.output, |tmp| {
                Ok(Tensor::write_safetensors(&tensors, tmp)?)
            })?;
        }
        Command::Generate {
            common,
            max_new_tokens,
            do_sample,
            temperature,
            top_p,
            top_k,
            seed,
            num_beams,
            num_beam_groups,
            diversity_penalty,
            length_penalty,
            num_return_sequences,
            stop,
        } => {
            let e = engine(&common)?;
            let default_adapter = common.adapter.as_ref().map(|_| ADAPTER_NAME.to_string());
            let input = read_input(&common.input)?;
            let decoding = if num_beams > 1 {
                Decoding::Beam {
                    num_beams,
                    num_beam_groups,
                    diversity_penalty,
                    length_penalty,
                }
            } else if do_sample {
                Decoding::Sample {
                    temperature,
                    top_k,
                    top_p,
                    seed,
                }
            } else {
                Decoding::Greedy
            };
            let params = GenerationParams {
                max_new_tokens,
                decoding,
                num_return_sequences,
                stop,
                eos_token_ids: vec![],
            };
            let reqs = input
                .iter()
                .map(|l| {
                    Ok(GenerateRequest {
                        adapter: l.adapter.clone().or_else(|| default_adapter.clone()),
                        prompt: e.tokenizer().encode_chat(&l.messages, true)?,
                        params: params.clone(),
                    })
                })
                .collect::<CliResult<Vec<_>>>()?;
            let outs = e.generate(&reqs)?;
            let lines: Vec<serde_json::Value> = input
                .iter()
                .zip(outs)
                .map(|(l, o)| {
                    serde_json::json!({
                        "id": l.id,
                        "outputs": o.sequences.iter().map(|s| serde_json::json!({
                            "ids": s.ids, "text": s.text, "logprob": s.logprob, "score": s.score, "finish": s.finish,
                        })).collect::<Vec<_>>(),
                    })
                })
                .collect();
            write_jsonl(&common.output, &lines)?;
        }
        Command::Score { common } => {
            let e = engine(&common)?;
            let default_adapter = common.adapter.as_ref().map(|_| ADAPTER_NAME.to_string());
            let input = read_input(&common.input)?;
            let mut lines = Vec::new();
            for (n, l) in input.iter().enumerate() {
                let prompt = e.tokenizer().encode_chat(&l.messages, true)?;
                if let Some(c) = &l.completion {
                    let completion = e.tokenizer().encode(c)?;
                    let s = e.score(&[ScoreRequest {
                        adapter: l.adapter.clone().or_else(|| default_adapter.clone()),
                        prompt,
                        completion: completion.clone(),
                    }])?;
                    lines.push(serde_json::json!({
                        "id": l.id, "completion_ids": completion, "logprob": s[0].logprob, "token_logprobs": s[0].token_logprobs,
                    }));
                } else if let Some(labels) = &l.labels {
                    let mut ids = Vec::new();
                    for lab in labels {
                        let t = e.tokenizer().encode(lab)?;
                        match t.as_slice() {
                            [one] => ids.push(*one),
                            _ => {
                                return Err(format!(
                                    "{} line {}: label {lab:?} is not a single token ({t:?})",
                                    common.input.display(),
                                    n + 1
                                )
                                .into())
                            }
                        }
                    }
                    let c = e.classify(&[ClassifyRequest {
                        adapter: l.adapter.clone().or_else(|| default_adapter.clone()),
                        prompt,
                        labels: ids.clone(),
                    }])?;
                    lines.push(serde_json::json!({
                        "id": l.id, "labels": labels, "label_ids": ids, "label_logprobs": c[0].label_logprobs, "raw_logprobs": c[0].raw_logprobs,
                    }));
                } else {
                    return Err(format!(
                        "{} line {}: needs \"completion\" or \"labels\"",
                        common.input.display(),
                        n + 1
                    )
                    .into());
                }
            }
            write_jsonl(&common.output, &lines)?;
        }
    }
    Ok(())
}

fn main() {
    // CPU runs allocate and free large activations every layer: keep them in the heap.
    flowtune_lm::heap::retain_freed_memory();
    if let Err(e) = run() {
        eprintln!("flowtune-lm: {e}");
        std::process::exit(1);
    }
}
