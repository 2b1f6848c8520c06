"""HF transformers side of the flowtune-lm benchmark (see scripts/bench-lm.sh).

Loads the model (a GGUF, dequantised, or an HF folder) with transformers in the given dtype on
CPU and measures, with the same shapes as crates/flowtune-lm/examples/bench.rs: prefill tok/s (one
forward over a 512-token prompt), decode tok/s at batch 1 and 8 (200-token prompts, 64 greedy new
tokens with the KV cache, timed after the prefill). Prints one JSON object.
"""
import argparse
import json
import os
import time

import torch


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", required=True)
    ap.add_argument("--dtype", choices=["f32", "bf16"], default="f32")
    ap.add_argument("--threads", type=int, default=os.cpu_count())
    ap.add_argument("--repeats", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    import transformers as T

    dtype = {"f32": torch.float32, "bf16": torch.bfloat16}[args.dtype]
    if os.path.isdir(args.model):  # an HF folder
        model = T.AutoModelForCausalLM.from_pretrained(args.model, dtype=dtype).eval()
    else:  # a GGUF file
        d, f = os.path.dirname(args.model), os.path.basename(args.model)
        model = T.AutoModelForCausalLM.from_pretrained(d, gguf_file=f, dtype=dtype).eval()
    g = torch.Generator().manual_seed(0)
    vocab = model.config.vocab_size

    def prefill(n):
        ids = torch.randint(10, vocab, (1, n), generator=g)
        best = float("inf")
        for _ in range(args.repeats):
            t = time.perf_counter()
            with torch.no_grad():
                model(input_ids=ids, logits_to_keep=1)
            best = min(best, time.perf_counter() - t)
        return n / best

    def decode(batch, prompt, new):
        ids = torch.randint(10, vocab, (batch, prompt), generator=g)
        best = float("inf")
        for _ in range(args.repeats):
            with torch.no_grad():
                o = model(input_ids=ids, use_cache=True, logits_to_keep=1)
                past = o.past_key_values
                nxt = o.logits[:, -1].argmax(-1, keepdim=True)
                t = time.perf_counter()
                for _ in range(new):
                    o = model(input_ids=nxt, past_key_values=past, use_cache=True)
                    past = o.past_key_values
                    nxt = o.logits[:, -1].argmax(-1, keepdim=True)
                best = min(best, time.perf_counter() - t)
        return batch * new / best

    res = {
        "impl": "transformers",
        "dtype": args.dtype,
        "threads": args.threads,
        "prefill_512_tok_s": prefill(512),
        "decode_b1_tok_s": decode(1, 200, 64),
        "decode_b8_tok_s": decode(8, 200, 64),
    }
    print(json.dumps(res))


if __name__ == "__main__":
    main()
