"""Golden values for flowtune-lm's model and engine, computed with HF transformers.

Modes (all write into --out, a directory):
  tiny   --tokenizer-from GGUF : tiny random-weight (seeded) Llama / Mistral / Qwen2 / Phi-3
         models saved as HF folders <out>/<arch>/ (config.json, model.safetensors, tokenizer
         files exported from the GGUF), and <out>/tiny_golden.safetensors with, per arch,
         `<arch>.ids` [B,T] int64, `<arch>.mask` [B,T] int64 (ragged: left padding) and
         `<arch>.logits` [B,T,V] float32 from a full forward in float32.
  gguf   --model GGUF --prompts PROMPTS.json : transformers loads the GGUF (dequantised, float32);
         for each prompt (a list of chat messages) writes `ids.{i}` (prompt ids from the chat
         template with the generation prompt), `logits.{i}` (last position, float32),
         `greedy.{i}` (32 greedy new tokens) and `gap.{i}` (per generated step, the gap between
         the top two logits, to locate near-ties) into <out>/gguf_golden.safetensors.
"""
import argparse
import json
import os
import sys

import torch
from safetensors.torch import save_file

torch.set_num_threads(max(1, os.cpu_count() or 1))


def tiny_configs(vocab):
    import transformers as T

    common = dict(
        vocab_size=vocab,
        hidden_size=64,
        intermediate_size=96,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=0,
    )
    return {
        "llama": T.LlamaConfig(
            **common,
            tie_word_embeddings=True,
            rope_parameters={
                "rope_type": "llama3",
                "rope_theta": 500000.0,
                "factor": 8.0,
                "low_freq_factor": 1.0,
                "high_freq_factor": 4.0,
                "original_max_position_embeddings": 16,
            },
        ),
        "mistral": T.MistralConfig(**common, sliding_window=7, tie_word_embeddings=False),
        "qwen2": T.Qwen2Config(
            **common, use_sliding_window=True, sliding_window=6, max_window_layers=1, tie_word_embeddings=False
        ),
        "phi3": T.Phi3Config(
            **{**common, "max_position_embeddings": 64},
            original_max_position_embeddings=16,
            partial_rotary_factor=0.5,
            tie_word_embeddings=False,
            rope_parameters={
                "rope_type": "longrope",
                "rope_theta": 10000.0,
                "partial_rotary_factor": 0.5,
                "long_factor": [1.0 + 0.5 * i for i in range(4)],
                "short_factor": [1.0 + 0.1 * i for i in range(4)],
            },
        ),
    }


def mode_tiny(args):
    import transformers as T

    tok = T.AutoTokenizer.from_pretrained(
        os.path.dirname(args.tokenizer_from), gguf_file=os.path.basename(args.tokenizer_from)
    )
    vocab = len(tok)
    golden = {}
    gen = torch.Generator().manual_seed(1234)
    # Ragged batch: row 0 full, row 1 left-padded by 5, row 2 left-padded by 11. Length 24 so the
    # sliding windows (6, 7) and the long-rope switch (> 16 positions) are exercised.
    B, L = 3, 24
    pads = [0, 5, 11]
    for arch, cfg in tiny_configs(vocab).items():
        torch.manual_seed(42)
        cfg._attn_implementation = "eager"
        model = T.AutoModelForCausalLM.from_config(cfg, attn_implementation="eager").float().eval()
        # Random init is small (std 0.02); widen norms so the test is not trivially near zero.
        with torch.no_grad():
            for n, p in model.named_parameters():
                if "norm" in n:
                    p.copy_(1.0 + 0.1 * torch.randn(p.shape, generator=gen))
                elif n.endswith("bias"):
                    p.copy_(0.1 * torch.randn(p.shape, generator=gen))
                else:
                    p.copy_(0.08 * torch.randn(p.shape, generator=gen))
        folder = os.path.join(args.out, arch)
        model.save_pretrained(folder, safe_serialization=True)
        tok.save_pretrained(folder)
        ids = torch.randint(3, vocab, (B, L), generator=gen)
        mask = torch.ones(B, L, dtype=torch.long)
        for b, p in enumerate(pads):
            mask[b, :p] = 0
            ids[b, :p] = 0
        with torch.no_grad():
            # Positions as transformers' generate computes them for left padding.
            pos = (mask.cumsum(-1) - 1).clamp(min=0)
            logits = model(input_ids=ids, attention_mask=mask, position_ids=pos).logits.float()
        golden[f"{arch}.ids"] = ids.contiguous()
        golden[f"{arch}.mask"] = mask.contiguous()
        golden[f"{arch}.logits"] = logits.contiguous()
    save_file(golden, os.path.join(args.out, "tiny_golden.safetensors"))


def mode_gguf(args):
    import transformers as T

    d, f = os.path.dirname(args.model), os.path.basename(args.model)
    tok = T.AutoTokenizer.from_pretrained(d, gguf_file=f)
    model = T.AutoModelForCausalLM.from_pretrained(d, gguf_file=f, dtype=torch.float32).eval()
    prompts = json.load(open(args.prompts))
    out = {}
    for i, messages in enumerate(prompts):
        ids = tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=False)
        if isinstance(ids, dict) or hasattr(ids, "input_ids"):
            ids = ids["input_ids"]
        ids_t = torch.tensor([ids], dtype=torch.long)
        with torch.no_grad():
            logits = model(input_ids=ids_t).logits[0, -1].float()
            seq = ids_t
            gaps = []
            new = []
            past = None
            cur = ids_t
            for _ in range(args.new_tokens):
                o = model(input_ids=cur, past_key_values=past, use_cache=True)
                past = o.past_key_values
                last = o.logits[0, -1].float()
                top2 = torch.topk(last, 2).values
                gaps.append(float(top2[0] - top2[1]))
                nxt = int(torch.argmax(last))
                new.append(nxt)
                cur = torch.tensor([[nxt]])
        out[f"ids.{i}"] = ids_t[0].contiguous()
        out[f"logits.{i}"] = logits.contiguous()
        out[f"greedy.{i}"] = torch.tensor(new, dtype=torch.long)
        out[f"gap.{i}"] = torch.tensor(gaps, dtype=torch.float32)
    save_file(out, os.path.join(args.out, "gguf_golden.safetensors"))


def mode_beam(args):
    """Beam search (num_beams=4, 4 returned) with transformers' generate on the GGUF model:
    <out>/beam_golden.json = [{"prompt": ids, "sequences": [[new ids]...], "scores": [...]}]."""
    import transformers as T

    d, f = os.path.dirname(args.model), os.path.basename(args.model)
    model = T.AutoModelForCausalLM.from_pretrained(d, gguf_file=f, dtype=torch.float32).eval()
    prompts = json.load(open(args.prompts))
    res = []
    for ids in prompts:
        inp = torch.tensor([ids])
        with torch.no_grad():
            o = model.generate(
                inp,
                attention_mask=torch.ones_like(inp),
                do_sample=False,
                num_beams=4,
                num_return_sequences=4,
                max_new_tokens=args.new_tokens,
                length_penalty=1.0,
                early_stopping=False,
                output_scores=True,
                return_dict_in_generate=True,
                pad_token_id=2,
            )
        seqs = [[int(t) for t in s[len(ids):]] for s in o.sequences]
        res.append({"prompt": ids, "sequences": seqs, "scores": [float(x) for x in o.sequences_scores]})
    json.dump(res, open(os.path.join(args.out, "beam_golden.json"), "w"))


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("mode", choices=["tiny", "gguf", "beam"])
    ap.add_argument("--out", required=True)
    ap.add_argument("--tokenizer-from")
    ap.add_argument("--model")
    ap.add_argument("--prompts")
    ap.add_argument("--new-tokens", type=int, default=32)
    args = ap.parse_args()
    os.makedirs(args.out, exist_ok=True)
    {"tiny": mode_tiny, "gguf": mode_gguf, "beam": mode_beam}[args.mode](args)


if __name__ == "__main__":
    sys.exit(main())
