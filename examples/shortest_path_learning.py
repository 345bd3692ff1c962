"""Learn 12x12 grid costs from features, then route through them (predict-then-optimize).

Synthetic Warcraft-style data, generated here (no download): each instance has a
feature vector x in R^5; the true vertex costs are c = ((B x)/sqrt(5) + 3)^2 / 9 + 0.1
(a fixed random 0/1 matrix B, so the map is nonlinear in x), and the label is the
cheapest top-left -> bottom-right 8-neighbour path under c.  A linear model predicts
the 144 costs from x and is trained three ways:

- perturbed Fenchel-Young loss (Berthet et al. 2020) on the predicted costs;
- identity-with-projection backward (Sahoo et al. 2023) through the solver, Hamming loss;
- blackbox backward (Vlastelica et al. 2020) through the solver, Hamming loss.

Printed per method: test path accuracy (the predicted path is optimal for the true
costs), normalized regret, and time per epoch.  Runs on the CPU in about a minute:

    python examples/shortest_path_learning.py [--epochs 25] [--train 800] [--seed 0]
"""
from __future__ import annotations

import argparse
import time

import torch

from nonsmooth.solvers import (blackbox_backward, fenchel_young_loss, identity_backward,
                               shortest_path_grid)

GRID, FEATURES = 12, 5


def make_data(n: int, gen: torch.Generator, B: torch.Tensor):
    x = torch.randn(n, FEATURES, generator=gen, dtype=torch.float64)
    costs = ((x @ B.T) / FEATURES ** 0.5 + 3) ** 2 / 9 + 0.1
    costs = costs.reshape(n, GRID, GRID)
    return x, costs, shortest_path_grid(costs)


def evaluate(model, x, costs, paths):
    with torch.no_grad():
        pred = shortest_path_grid(model(x).reshape(-1, GRID, GRID))
    true_cost = (paths * costs).sum((1, 2))
    pred_cost = (pred * costs).sum((1, 2))
    optimal = (pred_cost - true_cost).abs() <= 1e-9 * true_cost
    return optimal.double().mean().item(), ((pred_cost - true_cost).sum() / true_cost.sum()).item()


def train(method: str, data, *, epochs: int, seed: int):
    x_tr, c_tr, p_tr, x_te, c_te, p_te = data
    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(FEATURES, GRID * GRID), torch.nn.Softplus())
    model = model.double()
    opt = torch.optim.Adam(model.parameters(), lr=0.02)
    if method == "perturbed Fenchel-Young":
        loss_fn = fenchel_young_loss(shortest_path_grid, num_samples=8, sigma=0.2,
                                     noise="normal", seed=seed)
        step_loss = lambda theta, path: loss_fn(theta, path).mean()
    else:
        layer = identity_backward(shortest_path_grid, projection="mean") \
            if method == "identity (mean projection)" else \
            blackbox_backward(shortest_path_grid, lambda_=2.0)

        def step_loss(theta, path):  # Hamming distance to the true path
            y = layer(theta)
            return (y * (1 - path) + (1 - y) * path).sum((1, 2)).mean()
    gen = torch.Generator().manual_seed(seed)
    seconds = 0.0
    for _ in range(epochs):
        t0 = time.perf_counter()
        order = torch.randperm(len(x_tr), generator=gen)
        for i in range(0, len(order), 32):
            idx = order[i: i + 32]
            theta = model(x_tr[idx]).reshape(-1, GRID, GRID)
            loss = step_loss(theta, p_tr[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
        seconds += time.perf_counter() - t0
    acc, regret = evaluate(model, x_te, c_te, p_te)
    return acc, regret, seconds / epochs


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=25)
    parser.add_argument("--train", type=int, default=800)
    parser.add_argument("--test", type=int, default=200)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    gen = torch.Generator().manual_seed(args.seed)
    B = torch.bernoulli(torch.full((GRID * GRID, FEATURES), 0.5), generator=gen).double()
    train_set = make_data(args.train, gen, B)
    test_set = make_data(args.test, gen, B)
    data = (*train_set, *test_set)

    torch.manual_seed(args.seed)
    untrained = torch.nn.Sequential(torch.nn.Linear(FEATURES, GRID * GRID),
                                    torch.nn.Softplus()).double()
    acc0, regret0 = evaluate(untrained, *test_set)
    print(f"12x12 shortest paths, {args.train} train / {args.test} test instances, "
          f"{args.epochs} epochs, batch 32")
    print(f"{'method':<28} {'path accuracy':>13} {'regret':>8} {'s / epoch':>10}")
    print(f"{'untrained model':<28} {acc0:>13.3f} {regret0:>8.3f} {'-':>10}")
    for method in ("perturbed Fenchel-Young", "identity (mean projection)", "blackbox"):
        acc, regret, sec = train(method, data, epochs=args.epochs, seed=args.seed)
        print(f"{method:<28} {acc:>13.3f} {regret:>8.3f} {sec:>10.3f}")


if __name__ == "__main__":
    main()
