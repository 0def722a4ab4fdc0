"""The reference recipe against a literal transcription of the study's probe training.

The oracle below is the study's probe written out as in its code: `nn.Linear(C, outputs,
bias=False)` with its default init, outputs laid out on the layer grid, nearest-upsampled to the
image (`F.interpolate(scale_factor=…)`), `nn.CrossEntropyLoss` on integer masks (two outputs) or
`nn.HuberLoss` on normalised depth, Adam, one probe per property.
"""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from training.reference import fit_reference, head_columns, reference_loss

H = W = 16  # image
h = w = 4  # layer grid (scale factor 4)
C = 6


def _data(n=6, seed=0):
    """Activations [N, h·w, C] and labels [N, 2, H, W]: a {0, 1} mask and a z-scored depth
    that varies inside each layer pixel's 4×4 block (where Huber's two forms part)."""
    g = torch.Generator().manual_seed(seed)
    X = torch.randn(n, h * w, C, generator=g)
    mask = (torch.rand(n, H, W, generator=g) > 0.6).float()
    depth = 2.5 * torch.randn(n, H, W, generator=g)
    return X, torch.stack([mask, depth], dim=1)


def _study_probe(X, labels_k, kind, outputs, epochs, lr, seed, weight_seed):
    """The study's training of one probe (oracle). Batches: the same shuffles as fit_reference."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(weight_seed)
        probe = nn.Linear(C, outputs, bias=False)
    opt = torch.optim.Adam(probe.parameters(), lr=lr)
    loss_func = nn.CrossEntropyLoss() if kind == "mask" else nn.HuberLoss()
    gen = torch.Generator().manual_seed(seed)
    for _ in range(epochs):
        order = torch.randperm(X.shape[0], generator=gen)
        for start in range(0, X.shape[0], 4):
            idx = order[start:start + 4]
            out = probe(X[idx]).view(-1, h, w, outputs).permute([0, 3, 1, 2])
            out = F.interpolate(out, scale_factor=H // h)
            target = labels_k[idx].long() if kind == "mask" else labels_k[idx][:, None]
            loss = loss_func(out, target)
            opt.zero_grad()
            loss.backward()
            opt.step()
    return probe.weight.detach().T  # [C, outputs]


def test_study_recipe_equals_the_studys_training_exactly():
    """Item 4 (Huber on the upsampled output) and item 6 (two-output bias-free nn.Linear, default
    init, cross-entropy): fit_reference under the study's settings reproduces the oracle."""
    X, Y = _data()
    kinds = ["mask", "continuous"]
    ours = fit_reference(X, Y, (h, w), kinds, epochs=3, lr=1e-2, batch_images=4, seed=7, init="linear-default",
                         mask_head="two-class")
    mask_w = _study_probe(X, Y[:, 0], "mask", 2, epochs=3, lr=1e-2, seed=7, weight_seed=7)
    depth_w = _study_probe(X, Y[:, 1], "continuous", 1, epochs=3, lr=1e-2, seed=7, weight_seed=8)
    # The two-output head is stored as one logit: its sigmoid is the softmax's foreground probability.
    torch.testing.assert_close(ours[:, 0], mask_w[:, 1] - mask_w[:, 0], rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(ours[:, 1], depth_w[:, 0], rtol=1e-4, atol=1e-5)
    z = X @ mask_w
    torch.testing.assert_close(torch.sigmoid(X @ ours[:, 0]), z.softmax(-1)[..., 1], rtol=1e-4, atol=1e-5)


def test_huber_is_taken_at_image_resolution_not_on_area_averaged_labels():
    """The gradient at w = 0 is the study's, and differs from the area-averaged form's (the old
    behaviour) by a clear margin on labels that vary inside a layer pixel."""
    X, Y = _data(n=4, seed=1)
    depth = Y[:, 1:2]
    pred = torch.zeros(4, 1, h, w, requires_grad=True)
    reference_loss(pred, depth, ["continuous"], [[0]]).backward()
    ours = pred.grad.clone()
    study = torch.zeros(4, 1, h, w, requires_grad=True)
    nn.HuberLoss()(F.interpolate(study, scale_factor=H // h), depth).backward()
    torch.testing.assert_close(ours, study.grad, rtol=1e-6, atol=1e-8)
    pooled = torch.zeros(4, 1, h, w, requires_grad=True)
    F.huber_loss(pooled, F.adaptive_avg_pool2d(depth, (h, w))).backward()
    assert (pooled.grad - study.grad).norm() / study.grad.norm() > 0.2


@pytest.mark.parametrize("kind", ["mask", "continuous"])
def test_zero_init_and_logit_head_are_ours(kind):
    """The ldmprobe protocol keeps one logit from zero (BCE) for masks; the result differs from
    the study's two-class head, so the switch is real."""
    X, Y = _data(n=4, seed=2)
    k = 0 if kind == "mask" else 1
    ours = fit_reference(X, Y[:, k:k + 1], (h, w), [kind], epochs=1, lr=1e-2, init="zeros", mask_head="logit")
    study = fit_reference(X, Y[:, k:k + 1], (h, w), [kind], epochs=1, lr=1e-2, init="linear-default",
                          mask_head="two-class")
    assert ours.shape == study.shape == (C, 1) and not torch.allclose(ours, study, atol=1e-3)
    assert head_columns(["mask", "continuous", "mask"], "two-class") == [[0, 1], [2], [3, 4]]


def test_bad_options_are_refused():
    X, Y = _data(n=2)
    with pytest.raises(ValueError, match="unknown probe init"):
        fit_reference(X, Y, (h, w), ["mask", "continuous"], epochs=1, init="xavier")
    with pytest.raises(ValueError, match="unknown mask head"):
        fit_reference(X, Y, (h, w), ["mask", "continuous"], epochs=1, mask_head="softmax3")
    with pytest.raises(ValueError, match="tokens, not 3×3"):
        fit_reference(X, Y, (3, 3), ["mask", "continuous"], epochs=1)
