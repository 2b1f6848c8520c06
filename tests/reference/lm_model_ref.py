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
    <out>/beam_golden.json = [{"prompt": ids, "sequences": [[new ids]...], "scores": [...]}]; then the
    same prompts through `mode_group_beam`'s re-implementation (--num-beams/--num-beam-groups/
    --diversity-penalty/--num-return) into <out>/group_beam_golden.json."""
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
    # The same prompts through the group beam search re-implementation (one model load).
    _group_beam_run(model, prompts, args)


class _Hyps:
    """transformers 4.x BeamHypotheses (early_stopping=False)."""

    def __init__(self, n, length_penalty):
        self.n, self.lp, self.beams, self.worst = n, length_penalty, [], 1e9

    def add(self, ids, sum_logprobs, generated_len):
        score = sum_logprobs / (generated_len**self.lp)
        if len(self.beams) < self.n or score > self.worst:
            self.beams.append((score, ids))
            if len(self.beams) > self.n:
                srt = sorted([(s, i) for i, (s, _) in enumerate(self.beams)])
                del self.beams[srt[0][1]]
                self.worst = srt[1][0]
            else:
                self.worst = min(score, self.worst)

    def is_done(self, best_sum_logprobs, generated_len):
        if len(self.beams) < self.n:
            return False
        return self.worst >= best_sum_logprobs / (generated_len**self.lp)


def mode_group_beam(args):
    """Re-implementation of transformers 4.x `_group_beam_search` + `BeamSearchScorer` (removed from
    transformers 5; the hub repository it moved to is unreachable here), greedy group beam search
    with the Hamming diversity penalty, on the GGUF model in float32. Writes
    <out>/group_beam_golden.json = [{"sequences": [[new ids incl. EOS]...], "scores": [...]}]."""
    import transformers as T

    d, f = os.path.dirname(args.model), os.path.basename(args.model)
    model = T.AutoModelForCausalLM.from_pretrained(d, gguf_file=f, dtype=torch.float32).eval()
    _group_beam_run(model, json.load(open(args.prompts)), args)


def _group_beam_run(model, prompts, args):
    eos = model.generation_config.eos_token_id
    eos = set(eos if isinstance(eos, list) else [eos])
    nb, ng, pen, lp = args.num_beams, args.num_beam_groups, args.diversity_penalty, 1.0
    gs = nb // ng
    res = []
    for prompt in prompts:
        seqs = [[] for _ in range(nb)]
        scores = torch.full((nb,), -1e9)
        scores[::gs] = 0.0
        hyps = [_Hyps(gs, lp) for _ in range(ng)]
        done = [False] * ng
        past = None
        cur = torch.tensor([prompt] * nb)
        pad = min(eos)
        for step in range(args.new_tokens):
            with torch.no_grad():
                o = model(input_ids=cur, past_key_values=past, use_cache=True)
            past = o.past_key_values
            logp = torch.log_softmax(o.logits[:, -1].float(), -1)
            V = logp.shape[-1]
            reorder = list(range(nb))
            tokens = [pad] * nb
            new_scores = scores.clone()
            new_seqs = [None] * nb
            gen_len = step + 1
            for g in range(ng):
                lo, hi = g * gs, (g + 1) * gs
                if done[g]:
                    for r in range(lo, hi):
                        new_seqs[r] = seqs[r] + [pad]
                        new_scores[r] = 0.0
                    continue
                sc = logp[lo:hi].clone()
                if g > 0 and pen:
                    freq = torch.bincount(torch.tensor(tokens[:lo]), minlength=V).float()
                    sc = sc - pen * freq
                sc = sc + scores[lo:hi, None]
                top_v, top_i = torch.topk(sc.view(-1), 2 * gs)
                k = 0
                for rank, (v, i) in enumerate(zip(top_v.tolist(), top_i.tolist())):
                    b, t = i // V, i % V
                    if t in eos:
                        if rank >= gs:
                            continue
                        hyps[g].add(seqs[lo + b] + [t], v, gen_len)
                    else:
                        new_seqs[lo + k] = seqs[lo + b] + [t]
                        new_scores[lo + k] = v
                        reorder[lo + k] = lo + b
                        tokens[lo + k] = t
                        k += 1
                    if k == gs:
                        break
                done[g] = done[g] or hyps[g].is_done(top_v.max().item(), gen_len)
            seqs, scores = new_seqs, new_scores
            if all(done):
                break
            past.reorder_cache(torch.tensor(reorder))
            cur = torch.tensor([[t] for t in tokens])
        for g in range(ng):
            if done[g]:
                continue
            for r in range(g * gs, (g + 1) * gs):
                hyps[g].add(seqs[r], scores[r].item(), len(seqs[r]))
        allh = sorted([h for hy in hyps for h in hy.beams], key=lambda x: x[0], reverse=True)
        res.append({"sequences": [h[1] for h in allh[: args.num_return]], "scores": [h[0] for h in allh[: args.num_return]]})
    json.dump(res, open(os.path.join(args.out, "group_beam_golden.json"), "w"))


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("mode", choices=["tiny", "gguf", "beam", "group_beam"])
    ap.add_argument("--out", required=True)
    ap.add_argument("--tokenizer-from")
    ap.add_argument("--model")
    ap.add_argument("--prompts")
    ap.add_argument("--new-tokens", type=int, default=32)
    ap.add_argument("--num-beams", type=int, default=4)
    ap.add_argument("--num-beam-groups", type=int, default=2)
    ap.add_argument("--diversity-penalty", type=float, default=1.0)
    ap.add_argument("--num-return", type=int, default=4)
    args = ap.parse_args()
    os.makedirs(args.out, exist_ok=True)
    {"tiny": mode_tiny, "gguf": mode_gguf, "beam": mode_beam, "group_beam": mode_group_beam}[args.mode](args)


if __name__ == "__main__":
    sys.exit(main())
