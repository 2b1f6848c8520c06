"""Golden values for flowtune-loss and the learner.

  python loss_ref.py OUT.safetensors          loss/gradient goldens (flowtune-loss tests)
  python loss_ref.py parity MODEL.gguf OUTDIR completion log-prob parity (flowtune learner tests)

Parity mode: transformers loads the GGUF in f32; chat triples are tokenised with the
model's chat template (prompt: system + user + generation prompt; completion: the
assistant content tokens + the end-of-turn token `<|im_end|>`, as TRL counts them, not
the template's trailing newline). Summed completion log-probs (`selective_log_softmax`)
under the base model and under a PEFT LoRA adapter (r=8, alpha=16, rsLoRA, q_proj+v_proj,
B ~ N(0, 0.02^2) seeded) saved to OUTDIR/peft_adapter. Writes OUTDIR/parity.json.

All in float64, gradients by torch autograd.
- DPO: TRL 1.16 has no standalone `dpo_loss` (the loss is inline in
  `DPOTrainer._compute_loss`), so this script uses the sigmoid formula exactly as written
  there: `per_sequence_loss = -F.logsigmoid(beta * ((pc - rc) - (pr - rr)))`, with the
  reference log-probs under no_grad, plus the project's pair weights:
  `loss = sum(w * per_sequence_loss) / N` (TRL takes `.mean()`, i.e. w = 1).
  Rewards as TRL logs them: beta * (pc - rc), beta * (pr - rr).
- Completion log-probs: `trl.trainer.utils.selective_log_softmax` (TRL's own gather),
  masked and summed over the completion tokens.
- NLL: sum(w * -(summed completion log-probs)) / B.
- Label NLL: log_softmax over logits[:, label_ids], sum(w * -logp[target]) / B.
"""
import sys

import torch
import torch.nn.functional as F
from safetensors.torch import save_file
from trl.trainer.utils import selective_log_softmax

D = torch.float64


def dpo_cases(gen, out):
    specs = [
        # (beta, logprob scale, margin scale, weights kind)
        (1.0, 60.0, 5.0, "mixed"),
        (0.1, 60.0, 20.0, "mixed"),
        (2.5, 10.0, 0.5, "ones"),
        (1.0, 1e4, 1e4, "mixed"),  # extreme: saturated sigmoid both ways
        (1.0, 30.0, 3.0, "zeros"),
        (0.5, 1e3, 3e3, "ones"),
    ]
    for k, (beta, scale, margin, wkind) in enumerate(specs):
        n = 8
        base = -torch.rand(n, generator=gen, dtype=D) * scale
        pc = (base + torch.randn(n, generator=gen, dtype=D) * margin).requires_grad_(True)
        pr = (base + torch.randn(n, generator=gen, dtype=D) * margin).requires_grad_(True)
        rc = (base + torch.randn(n, generator=gen, dtype=D) * margin).requires_grad_(True)
        rr = (base + torch.randn(n, generator=gen, dtype=D) * margin).requires_grad_(True)
        if wkind == "mixed":
            w = torch.rand(n, generator=gen, dtype=D) * 2
            w[1] = 0.0
        elif wkind == "ones":
            w = torch.ones(n, dtype=D)
        else:
            w = torch.zeros(n, dtype=D)
        with torch.no_grad():
            ref_c, ref_r = rc.detach(), rr.detach()
        chosen_logratios = pc - ref_c
        rejected_logratios = pr - ref_r
        delta_score = chosen_logratios - rejected_logratios
        per_sequence_loss = -F.logsigmoid(beta * delta_score)
        loss = (w * per_sequence_loss).sum() / n
        loss.backward()
        p = f"dpo/{k}/"
        for name, t in [("pc", pc), ("pr", pr), ("rc", rc), ("rr", rr)]:
            out[p + name] = t.detach().clone()
        out[p + "w"] = w
        out[p + "beta"] = torch.tensor([beta], dtype=D)
        out[p + "loss"] = loss.detach().reshape(1)
        out[p + "per_pair"] = per_sequence_loss.detach()
        out[p + "grad_pc"] = pc.grad.clone()
        out[p + "grad_pr"] = pr.grad.clone()
        cr = beta * (pc - rc).detach()
        rj = beta * (pr - rr).detach()
        out[p + "stats"] = torch.stack([cr.mean(), rj.mean(), (cr - rj).mean(), (cr > rj).to(D).mean()])
    out["dpo/count"] = torch.tensor([len(specs)], dtype=D)


def seq_cases(gen, out):
    b, t, v = 3, 7, 50
    logits = (torch.randn(b, t, v, generator=gen, dtype=D) * 3).requires_grad_(True)
    targets = torch.randint(0, v, (b, t), generator=gen)
    # ragged: row 0 prompt 2 tokens, completion 5; row 1 prompt 4, completion 3;
    # row 2 prompt 1, completion 3, then 3 padding positions.
    mask = torch.zeros(b, t, dtype=torch.bool)
    mask[0, 2:] = True
    mask[1, 4:] = True
    mask[2, 1:4] = True
    targets_padded = targets.masked_fill(~mask, -100)
    per_token = selective_log_softmax(logits, targets_padded.clamp(min=0)).masked_fill(~mask, 0.0)
    seq = per_token.sum(-1)
    coef = torch.randn(b, generator=gen, dtype=D)
    (coef * seq).sum().backward()
    out["seq/logits"] = logits.detach().clone()
    out["seq/targets"] = targets_padded
    out["seq/mask"] = mask.to(torch.uint8)
    out["seq/logps"] = seq.detach()
    out["seq/coef"] = coef
    out["seq/grad_logits"] = logits.grad.clone()
    # NLL on the same inputs
    logits.grad = None
    w = torch.tensor([1.0, 0.5, 2.0], dtype=D)
    per_token = selective_log_softmax(logits, targets_padded.clamp(min=0)).masked_fill(~mask, 0.0)
    nll = (w * -per_token.sum(-1)).sum() / b
    nll.backward()
    out["nll/w"] = w
    out["nll/loss"] = nll.detach().reshape(1)
    out["nll/grad_logits"] = logits.grad.clone()


def label_cases(gen, out):
    b, v = 5, 50
    logits = (torch.randn(b, v, generator=gen, dtype=D) * 4).requires_grad_(True)
    labels = torch.tensor([7, 13, 42])
    targets = torch.tensor([0, 2, 1, 1, 0])
    w = torch.tensor([1.0, 0.0, 0.3, 2.0, 1.0], dtype=D)
    logp = F.log_softmax(logits[:, labels], dim=-1)
    tl = logp.gather(1, targets.unsqueeze(1)).squeeze(1)
    loss = (w * -tl).sum() / b
    loss.backward()
    out["label/logits"] = logits.detach().clone()
    out["label/ids"] = labels
    out["label/targets"] = targets
    out["label/w"] = w
    out["label/logp"] = logp.detach()
    out["label/loss"] = loss.detach().reshape(1)
    out["label/grad_logits"] = logits.grad.clone()


TRIPLES = [
    ("What is the capital of France?", "The capital of France is Paris.", "It is Lyon, I think."),
    ("Name a prime number larger than 10.", "13 is a prime number larger than 10.", "12."),
    ("Translate 'good morning' to Spanish.", "Buenos días.", "Bonjour, mon ami!"),
    ("Who wrote the play Hamlet? Answer briefly.", "William Shakespeare.", "Hamlet was written by Charles Dickens in 1850."),
    ("Is the sky green? Answer Yes or No.", "No", "Yes"),
]


def parity(model_path, outdir):
    import json
    import os

    import transformers as T
    from peft import LoraConfig, get_peft_model

    d, f = os.path.dirname(model_path), os.path.basename(model_path)
    tok = T.AutoTokenizer.from_pretrained(d, gguf_file=f)
    base = T.AutoModelForCausalLM.from_pretrained(d, gguf_file=f, dtype=torch.float32).eval()
    im_end = tok.convert_tokens_to_ids("<|im_end|>")
    records = []
    for q, c, r in TRIPLES:
        msgs = [{"role": "system", "content": "You are a helpful assistant."}, {"role": "user", "content": q}]
        prompt = tok.apply_chat_template(msgs, add_generation_prompt=True, tokenize=False)
        p_ids = tok(prompt, add_special_tokens=False)["input_ids"]
        c_ids = tok(c, add_special_tokens=False)["input_ids"] + [im_end]
        r_ids = tok(r, add_special_tokens=False)["input_ids"] + [im_end]
        records.append({"prompt": p_ids, "chosen": c_ids, "rejected": r_ids})

    def logps(model):
        out = []
        with torch.no_grad():
            for rec in records:
                row = []
                for comp in (rec["chosen"], rec["rejected"]):
                    ids = torch.tensor([rec["prompt"] + comp])
                    logits = model(input_ids=ids).logits[:, :-1]
                    tgt = ids[:, 1:]
                    lp = selective_log_softmax(logits.to(D), tgt)[0]
                    row.append(float(lp[len(rec["prompt"]) - 1 :].sum()))
                out.append(row)
        return out

    base_lp = logps(base)
    cfg = LoraConfig(r=8, lora_alpha=16, use_rslora=True, target_modules=["q_proj", "v_proj"], lora_dropout=0.0, task_type="CAUSAL_LM")
    torch.manual_seed(0)
    model = get_peft_model(base, cfg).eval()
    g = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.02)
    model.save_pretrained(os.path.join(outdir, "peft_adapter"))
    peft_lp = logps(model)
    with open(os.path.join(outdir, "parity.json"), "w") as fh:
        json.dump({"records": records, "base": base_lp, "peft": peft_lp}, fh)


def main():
    if sys.argv[1] == "parity":
        parity(sys.argv[2], sys.argv[3])
        return
    gen = torch.Generator().manual_seed(1234)
    out = {}
    dpo_cases(gen, out)
    seq_cases(gen, out)
    label_cases(gen, out)
    save_file({k: v.contiguous() for k, v in out.items()}, sys.argv[1])


if __name__ == "__main__":
    main()
