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
  export     GGUF  OUTDIR              the GGUF loaded by transformers, saved as an HF folder
                                       (float32 safetensors, config, tokenizer files)
"""
import json
import os
import sys

os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("HF_HUB_OFFLINE", "1")


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
    model.save_pretrained(outdir, safe_serialization=True)
    load_tokenizer(gguf_path).save_pretrained(outdir)


def main(argv):
    if len(argv) < 2:
        print(__doc__, file=sys.stderr)
        return 2
    cmd, args = argv[1], argv[2:]
    {"tokenize": cmd_tokenize, "template": cmd_template, "dequant": cmd_dequant, "export": cmd_export}[cmd](*args)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
