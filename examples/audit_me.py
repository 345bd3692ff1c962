"""A function to try `nonsmooth audit` on.

    nonsmooth audit examples/audit_me.py:relu_difference --at "[0.0, 1.0]"

relu(x) - relu(-x) equals x everywhere, so its true derivative is the identity; at an
exact zero, backprop through relu returns 0 instead.
"""
import torch


def relu_difference(x):
    return torch.relu(x) - torch.relu(-x)


def hinge_net(x):
    W = torch.tensor([[1.0, -1.0], [0.5, 2.0]], dtype=x.dtype)
    return torch.clamp(W @ x, min=0.0).sum() + torch.abs(x[0])
