"""Export a GGUF model as an HF folder (config.json, model.safetensors, tokenizer files) in a
chosen dtype, through transformers' own GGUF loader: for benchmarks of HF-format checkpoints
(e.g. `scripts/bench-lm.sh` over a bf16 folder, the format most HF checkpoints ship in).

    .venv/bin/python tests/reference/export_hf.py --model M.gguf --dtype bf16 --out DIR
"""

import argparse
import os

import torch


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", required=True, help="a GGUF file")
    ap.add_argument("--dtype", choices=["f32", "bf16", "f16"], default="bf16")
    ap.add_argument("--out", required=True)
    args = ap.parse_args()
    import transformers as T

    dtype = {"f32": torch.float32, "bf16": torch.bfloat16, "f16": torch.float16}[args.dtype]
    d, f = os.path.dirname(args.model), os.path.basename(args.model)
    model = T.AutoModelForCausalLM.from_pretrained(d, gguf_file=f, dtype=dtype)
    tok = T.AutoTokenizer.from_pretrained(d, gguf_file=f)
    # transformers refuses to save a model loaded from a GGUF: copy its weights into a fresh
    # model of the same config (as tests/reference/lm_load_ref.py does) and save that.
    config = model.config
    if hasattr(config, "quantization_config"):
        delattr(config, "quantization_config")
    fresh = T.AutoModelForCausalLM.from_config(config, dtype=dtype)
    missing, unexpected = fresh.load_state_dict(model.state_dict(), strict=False)
    assert not unexpected and all("lm_head" in k for k in missing), (missing, unexpected)
    fresh.tie_weights()
    fresh.save_pretrained(args.out, safe_serialization=True)
    tok.save_pretrained(args.out)
    print(args.out)


if __name__ == "__main__":
    main()
