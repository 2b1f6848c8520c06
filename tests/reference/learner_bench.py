"""The Python side of the learner benchmark: one DPO learner step in transformers + PEFT.

  python learner_bench.py MODEL.gguf IDS.json [--steps 3]

Writes IDS.json (the shared workload, seeded: 4 pairs, 240-token prompts, 60-token
chosen and rejected completions, token ids in [100, 40000)) if it does not exist, then
times the step the way a transformers + PEFT DPO trainer runs it: bf16 base, LoRA r=8
(alpha 16, rsLoRA) on q_proj+v_proj as adapter "default" (trained, f32 as PEFT keeps
adapters) and a copy "ref" (reference); concatenated [chosen; rejected] batch of 8 x 300
tokens; policy forward with grad; reference forward under no_grad with the "ref"
adapter; summed completion log-probs (TRL's selective_log_softmax); sigmoid DPO loss
(beta 1, weights 1); backward; clip_grad_norm_(1.0); parameterfree COCOB (alpha 1000)
step. Prints one JSON line: {"python_step_s": median, "steps": [...]}.
"""
import json
import os
import sys
import time

import torch


def workload(path):
    if os.path.exists(path):
        return json.load(open(path))
    g = torch.Generator().manual_seed(42)
    rnd = lambda n: torch.randint(100, 40000, (n,), generator=g).tolist()
    pairs = [{"prompt": rnd(240), "chosen": rnd(60), "rejected": rnd(60), "weight": 1.0} for _ in range(4)]
    with open(path, "w") as fh:
        json.dump({"pairs": pairs}, fh)
    return {"pairs": pairs}


def main():
    import transformers as T
    from parameterfree import COCOB
    from peft import LoraConfig, get_peft_model
    from trl.trainer.utils import selective_log_softmax

    model_path, ids_path = sys.argv[1], sys.argv[2]
    steps = int(sys.argv[4]) if len(sys.argv) > 4 and sys.argv[3] == "--steps" else 3
    pairs = workload(ids_path)["pairs"]
    d, f = os.path.dirname(model_path), os.path.basename(model_path)
    base = T.AutoModelForCausalLM.from_pretrained(d, gguf_file=f, dtype=torch.bfloat16)
    cfg = LoraConfig(r=8, lora_alpha=16, use_rslora=True, target_modules=["q_proj", "v_proj"], lora_dropout=0.0, task_type="CAUSAL_LM")
    model = get_peft_model(base, cfg)
    model.add_adapter("ref", cfg)
    model.set_adapter("default")
    params = [p for n, p in model.named_parameters() if p.requires_grad]
    opt = COCOB(params, alpha=1000)
    model.train()

    seqs = [p["prompt"] + p["chosen"] for p in pairs] + [p["prompt"] + p["rejected"] for p in pairs]
    ids = torch.tensor(seqs)
    plen = len(pairs[0]["prompt"])
    mask = torch.zeros_like(ids[:, 1:], dtype=torch.bool)
    mask[:, plen - 1 :] = True
    tgt = ids[:, 1:]
    n = len(pairs)

    def logps(m):
        logits = m(input_ids=ids).logits[:, :-1]
        return selective_log_softmax(logits, tgt).masked_fill(~mask, 0.0).sum(-1)

    def step():
        opt.zero_grad()
        with torch.no_grad():
            model.set_adapter("ref")
            ref = logps(model)
            model.set_adapter("default")
        pol = logps(model)
        pc, pr, rc, rr = pol[:n], pol[n:], ref[:n], ref[n:]
        loss = (-torch.nn.functional.logsigmoid((pc - rc) - (pr - rr))).mean()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        return float(loss)

    step()  # warm-up
    times = []
    for _ in range(steps):
        t0 = time.perf_counter()
        step()
        times.append(time.perf_counter() - t0)
    times.sort()
    print(json.dumps({"python_step_s": times[len(times) // 2], "steps": times, "threads": torch.get_num_threads()}))


if __name__ == "__main__":
    main()
