#!/usr/bin/env python3
"""Reference for flowtune-lora: Python PEFT on the same base model.

Mode `regex --cases CASES.json --out OUT.json`: CASES is {"patterns": [...], "paths": [...]};
writes {pattern: [paths that re.fullmatch]} (PEFT matches string target_modules this way).

Mode `interop` (one invocation computes everything the Rust interop test needs):
  --model GGUF       transformers loads the GGUF (dequantised, float32)
  --ids IDS.json     list of token-id lists (the prompts, already chat-templated by flowtune)
  --ours DIR         a PEFT folder written by flowtune (save_peft)
  --out DIR          where to write `peft_adapter/` and `golden.safetensors`

It builds a PEFT LoRA adapter (r=8, lora_alpha=16, use_rslora=True, target_modules q_proj+v_proj,
PEFT default init for A from torch seed 0, then B ~ N(0, 0.02^2) so the adapter is not a no-op),
saves it with `save_pretrained` (PEFT's own file format), and writes last-position logits per
prompt for: the base model (`base.{i}`), PEFT's adapter (`peft.{i}`), and flowtune's adapter
loaded by PEFT (`ours.{i}`). Also `peft_b_norm` for a sanity check.
"""
import argparse
import json
import os

import re


def last_logits(model, ids):
    import torch

    with torch.no_grad():
        out = model(input_ids=torch.tensor([ids], dtype=torch.long))
    return out.logits[0, -1].float().contiguous()


def mode_interop(args):
    import torch
    import transformers as T
    from peft import LoraConfig, get_peft_model
    from safetensors.torch import save_file

    d, f = os.path.dirname(args.model), os.path.basename(args.model)
    torch.manual_seed(0)
    base = T.AutoModelForCausalLM.from_pretrained(d, gguf_file=f, dtype=torch.float32).eval()
    prompts = json.load(open(args.ids))
    golden = {}
    for i, ids in enumerate(prompts):
        golden[f"base.{i}"] = last_logits(base, ids)

    cfg = LoraConfig(
        r=8,
        lora_alpha=16,
        use_rslora=True,
        target_modules=["q_proj", "v_proj"],
        lora_dropout=0.0,
        task_type="CAUSAL_LM",
    )
    torch.manual_seed(0)
    model = get_peft_model(base, cfg).eval()
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.02)
    peft_dir = os.path.join(args.out, "peft_adapter")
    model.save_pretrained(peft_dir)
    golden["peft_b_norm"] = torch.tensor(
        [sum(float(p.norm() ** 2) for n, p in model.named_parameters() if "lora_B" in n) ** 0.5]
    )
    for i, ids in enumerate(prompts):
        golden[f"peft.{i}"] = last_logits(model, ids)

    # flowtune's adapter, loaded by PEFT itself.
    model.load_adapter(args.ours, adapter_name="ours")
    model.set_adapter("ours")
    model.eval()
    for i, ids in enumerate(prompts):
        golden[f"ours.{i}"] = last_logits(model, ids)
    save_file(golden, os.path.join(args.out, "golden.safetensors"))


def mode_regex(args):
    cases = json.load(open(args.cases))
    result = {p: [x for x in cases["paths"] if re.fullmatch(p, x)] for p in cases["patterns"]}
    json.dump(result, open(args.out, "w"))


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("mode", choices=["interop", "regex"])
    ap.add_argument("--model")
    ap.add_argument("--ids")
    ap.add_argument("--ours")
    ap.add_argument("--cases")
    ap.add_argument("--out", required=True)
    args = ap.parse_args()
    {"interop": mode_interop, "regex": mode_regex}[args.mode](args)


if __name__ == "__main__":
    main()
