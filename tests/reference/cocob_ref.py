"""Golden COCOB trajectories from the `parameterfree` package, for flowtune-cocob's tests.

Usage: python cocob_ref.py OUT.safetensors

For each case {quadratic, mlp} x {f64, f32} x {alpha 100, 1000}: seeded initial
parameters and data, then 50 steps of `parameterfree.COCOB` (eps 1e-8, no weight decay).
Writes, per case `{problem}_{dtype}_a{alpha}`:
  {case}/data/{name}      problem data (A, c for the quadratic; X, y for the MLP)
  {case}/traj/{param}     [51, *shape] parameters before step 1 .. after step 50
  {case}/loss             [50] loss at each step (before the update)
The forward passes use elementary ops that the Rust test repeats op for op.
Also `clip/{k}/grad_{i}`, `clip/{k}/clipped_{i}`, `clip/{k}/total_norm`, `clip/{k}/max_norm`
from torch.nn.utils.clip_grad_norm_ on random gradients.
"""
import sys

import torch
from parameterfree import COCOB
from safetensors.torch import save_file

STEPS = 50


def quadratic(dtype, gen):
    m = torch.randn(10, 10, generator=gen, dtype=torch.float64)
    a = (m @ m.T / 10 + torch.eye(10, dtype=torch.float64)).to(dtype)
    c = torch.randn(10, generator=gen, dtype=torch.float64).to(dtype)
    x = torch.randn(10, generator=gen, dtype=torch.float64).to(dtype)
    data = {"A": a, "c": c}
    params = {"x": x}

    def loss_fn(p):
        d = p["x"] - c
        return 0.5 * torch.dot(d, torch.mv(a, d))

    return data, params, loss_fn


def mlp(dtype, gen):
    def r(*shape, scale=1.0):
        return (torch.randn(*shape, generator=gen, dtype=torch.float64) * scale).to(dtype)

    x_in = r(32, 4)
    y = r(32, 1)
    params = {"w1": r(8, 4, scale=0.5), "b1": r(8, scale=0.1), "w2": r(1, 8, scale=0.5), "b2": r(1, scale=0.1)}
    data = {"X": x_in, "y": y}

    def loss_fn(p):
        h = torch.tanh(torch.matmul(x_in, p["w1"].t()) + p["b1"])
        out = torch.matmul(h, p["w2"].t()) + p["b2"]
        d = out - y
        return (d * d).mean()

    return data, params, loss_fn


def run_case(problem, dtype, alpha, seed):
    gen = torch.Generator().manual_seed(seed)
    data, init, loss_fn = (quadratic if problem == "quadratic" else mlp)(dtype, gen)
    params = {k: v.clone().requires_grad_(True) for k, v in init.items()}
    opt = COCOB(list(params.values()), alpha=alpha)
    traj = {k: [v.detach().clone()] for k, v in params.items()}
    losses = []
    for _ in range(STEPS):
        opt.zero_grad()
        loss = loss_fn(params)
        loss.backward()
        opt.step()
        losses.append(loss.detach().clone())
        for k, v in params.items():
            traj[k].append(v.detach().clone())
    out = {}
    name = f"{problem}_{'f64' if dtype == torch.float64 else 'f32'}_a{int(alpha)}"
    for k, v in data.items():
        out[f"{name}/data/{k}"] = v.contiguous()
    for k, v in traj.items():
        out[f"{name}/traj/{k}"] = torch.stack(v).contiguous()
    out[f"{name}/loss"] = torch.stack(losses)
    return out


def clip_cases():
    gen = torch.Generator().manual_seed(7)
    out = {}
    for k, (max_norm, scale) in enumerate([(1.0, 3.0), (1.0, 0.01), (0.5, 1.0), (10.0, 5.0)]):
        grads = [torch.randn(*s, generator=gen, dtype=torch.float64) * scale for s in [(3, 4), (7,), (2, 2, 2)]]
        ps = [torch.zeros_like(g, requires_grad=True) for g in grads]
        for p, g in zip(ps, grads):
            p.grad = g.clone()
        total = torch.nn.utils.clip_grad_norm_(ps, max_norm)
        for i, (p, g) in enumerate(zip(ps, grads)):
            out[f"clip/{k}/grad_{i}"] = g
            out[f"clip/{k}/clipped_{i}"] = p.grad.clone()
        out[f"clip/{k}/total_norm"] = total.reshape(1).to(torch.float64)
        out[f"clip/{k}/max_norm"] = torch.tensor([max_norm], dtype=torch.float64)
    return out


def main():
    torch.set_num_threads(1)
    out = {}
    seed = 0
    for problem in ["quadratic", "mlp"]:
        for dtype in [torch.float64, torch.float32]:
            for alpha in [100.0, 1000.0]:
                seed += 1
                out.update(run_case(problem, dtype, alpha, seed))
    out.update(clip_cases())
    save_file(out, sys.argv[1])


if __name__ == "__main__":
    main()
