#!/usr/bin/env python3
"""Reference values for flowtune-lm's loading side, computed with the Python stack in
the workspace venv (transformers 5, gguf). Each subcommand writes one JSON (or
safetensors) file so a Rust test needs one Python run.

Subcommands
  tokenize   GGUF  IN.json  OUT.json   ids of each string in IN (a JSON list), with the
                                       tokenizer transformers builds from the GGUF
  template   GGUF  IN.json  OUT.json   IN: {"conversations": [[{role, content}, ...]],
                                       "templates": {name: jinja source or null (the GGUF's)}}
                                       OUT: {name: [[rendered without gen prompt, with], ...]}
                                       (an entry is {"error": msg} when the template raises)
  dequant    GGUF  OUT.safetensors     every tensor dequantised by `gguf.quants.dequantize`
                                       (float32, llama.cpp names, file layout), plus OUT.json
                                       with the config transformers builds from the metadata
  models     OUTDIR GGUF...         each GGUF loaded by transformers: state dict, config and
                                       logits for fixed ids (OUTDIR/<stem>.safetensors/.json)
  export     GGUF  OUTDIR              the GGUF loaded by transformers, saved as an HF folder
                                       (float32 safetensors, config, tokenizer files)
"""
import json
import os
import sys

os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TQDM_DISABLE", "1")


def load_tokenizer(gguf_path):
    from transformers import AutoTokenizer

    d, f = os.path.split(os.path.abspath(gguf_path))
    return AutoTokenizer.from_pretrained(d, gguf_file=f)


def cmd_tokenize(gguf_path, inp, out):
    tok = load_tokenizer(gguf_path)
    texts = json.load(open(inp, encoding="utf-8"))
    ids = [tok.encode(t, add_special_tokens=False) for t in texts]
    decoded = [tok.decode(i, skip_special_tokens=False) for i in ids]
    json.dump({"ids": ids, "decoded": decoded}, open(out, "w", encoding="utf-8"), ensure_ascii=False)


def cmd_template(gguf_path, inp, out):
    tok = load_tokenizer(gguf_path)
    spec = json.load(open(inp, encoding="utf-8"))
    result = {}
    for name, source in spec["templates"].items():
        rendered = []
        for conv in spec["conversations"]:
            pair = []
            for gen in (False, True):
                try:
                    pair.append(
                        tok.apply_chat_template(
                            conv, chat_template=source, tokenize=False, add_generation_prompt=gen
                        )
                    )
                except Exception as e:  # the template raised (e.g. raise_exception)
                    pair.append({"error": str(e)})
            rendered.append(pair)
        result[name] = rendered
    json.dump(result, open(out, "w", encoding="utf-8"), ensure_ascii=False)


def cmd_dequant(gguf_path, out):
    import numpy as np
    from gguf import GGUFReader
    from gguf.quants import dequantize
    from safetensors.numpy import save_file

    r = GGUFReader(gguf_path)
    tensors = {}
    types = {}
    for t in r.tensors:
        a = dequantize(t.data, t.tensor_type)
        tensors[t.name] = np.ascontiguousarray(a.astype(np.float32))
        types[t.name] = t.tensor_type.name
    save_file(tensors, out)
    from transformers.modeling_gguf_pytorch_utils import load_gguf_checkpoint

    cfg = load_gguf_checkpoint(gguf_path, return_tensors=False)["config"]
    json.dump({"types": types, "config": cfg}, open(out + ".json", "w"), default=str)


def cmd_export(gguf_path, outdir):
    import torch
    from transformers import AutoModelForCausalLM

    d, f = os.path.split(os.path.abspath(gguf_path))
    model = AutoModelForCausalLM.from_pretrained(d, gguf_file=f, dtype=torch.float32)
    # transformers marks a GGUF-loaded model as quantised and refuses to save it; its
    # weights are plain float32 tensors, so move them into a fresh model of the same
    # config and save that.
    config = model.config
    if hasattr(config, "quantization_config"):
        delattr(config, "quantization_config")
    fresh = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    missing, unexpected = fresh.load_state_dict(model.state_dict(), strict=False)
    assert not unexpected and all("lm_head" in k for k in missing), (missing, unexpected)
    fresh.tie_weights()
    fresh.save_pretrained(outdir, safe_serialization=True)
    load_tokenizer(gguf_path).save_pretrained(outdir)


# Token ids fed to each model by `models` (all below the tiny test vocabularies).
PROBE_IDS = [3, 17, 42, 8, 60, 1, 33, 21, 5, 50, 7, 7, 19]


def cmd_models(outdir, *gguf_paths):
    """Each GGUF loaded by transformers (`from_pretrained(gguf_file=)`): its state
    dict (float32), its config, and the float32 logits for PROBE_IDS, written to
    OUTDIR/<stem>.safetensors and OUTDIR/<stem>.json."""
    import torch
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM

    os.makedirs(outdir, exist_ok=True)
    for path in gguf_paths:
        d, f = os.path.split(os.path.abspath(path))
        stem = os.path.splitext(f)[0]
        model = AutoModelForCausalLM.from_pretrained(d, gguf_file=f, dtype=torch.float32).eval()
        tensors = {k: v.detach().clone().contiguous() for k, v in model.state_dict().items()}
        with torch.no_grad():
            logits = model(torch.tensor([PROBE_IDS])).logits[0, :, :].float()
        tensors["__logits__"] = logits.contiguous()
        save_file(tensors, os.path.join(outdir, stem + ".safetensors"))
        json.dump(
            {"config": model.config.to_dict(), "probe_ids": PROBE_IDS},
            open(os.path.join(outdir, stem + ".json"), "w"),
            default=str,
        )


def main(argv):
    if len(argv) < 2:
        print(__doc__, file=sys.stderr)
        return 2
    cmd, args = argv[1], argv[2:]
    {"tokenize": cmd_tokenize, "template": cmd_template, "dequant": cmd_dequant, "export": cmd_export, "models": cmd_models}[cmd](*args)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
