"""Lookback Lens (Chuang et al. 2024, "Lookback Lens: Detecting and Mitigating Contextual
Hallucinations in Large Language Models Using Only Attention Maps"): per-head lookback ratios
while generating, from the attention statistics (never a t × s pattern), and a linear detector.

    lens = recipes.lookback.lookback_ratios(im, encoding, max_new_tokens=4)    # lens.ratios [b, L, H]
    detector = recipes.lookback.fit_logistic(train_x, train_y)
    recipes.lookback.auroc(detector.score(test_x), test_y)

At the decode step whose query is the j-th generated token (j ≥ 1), head (l, h) has
    LR_j = A(context) / (A(context) + A(new)),
A(context) the mean attention over the prompt's real tokens, A(new) the mean over the j tokens
generated so far (the query's own included) — the paper's means (its code's `.mean(-1)`), not sums.
The prefill step has no new token and no ratio (the paper's code gets NaN there). A row's feature
is the mean of LR_j over its steps until it emits EOS. The batch is left-padded (generate needs
it): every row's prompt then ends at column T0 and its new tokens start there, so two key spans
shared by all rows, [(0, T0), (T0, ∞)], are exact — pad columns are masked keys, with zero mass.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from ..errors import InvalidArgumentError, ShapeMismatchError
from ..state.indices import padded_stack

__all__ = ["Lookback", "lookback_ratios", "from_patterns", "step_entropy", "Detector", "fit_logistic",
           "auroc", "roc_curve"]

L2 = 1e-2                  # ridge on the standardised weights: 32-256 features, a few hundred examples
LBFGS_STEPS = 100          # full-batch LBFGS in fp64 converges in < 50 on these sizes


@dataclass(frozen=True)
class Lookback:
    """Lookback ratios of a generate call: per row and head the attention on the prompt over that
    plus the attention on the tokens generated so far, averaged over the decode steps. ratios
    [b, L, H] fp32, steps [b, n − 1, L, H] (LR_j of decode step j = 1 … n − 1), tokens [b, n] (the n
    generated tokens), valid [b, n − 1] bool; NaN where a row has no valid step."""
    ratios: torch.Tensor        # [b, L, H] fp32: mean over a row's valid steps (NaN: none)
    steps: torch.Tensor         # [b, n − 1, L, H]: LR_j of decode step j = 1 … n − 1 (NaN: not valid)
    tokens: torch.Tensor        # [b, n] the generated tokens
    valid: torch.Tensor         # [b, n − 1] bool: step j counts (no EOS among the first j tokens)


def lookback_ratios(im, encoding, *, max_new_tokens: int, **generate_kwargs) -> Lookback:
    """Greedy (or as generate_kwargs say) generation of up to max_new_tokens from a left-padded
    `encoding` (input_ids, attention_mask [b, T0]; position_ids are dropped: generate derives
    them from the mask), recording "attention_stats" at every step: a Lookback (ratios [b, L, H],
    tokens [b, n], n ≤ max_new_tokens)."""
    if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens < 2:
        raise InvalidArgumentError(f"max_new_tokens must be an int ≥ 2 (the first token has no ratio), "
                                   f"got {max_new_tokens!r}")
    ids, mask = encoding["input_ids"], _left_padded_mask(encoding)
    width = ids.shape[1]
    spans = [(0, width), (width, width + max_new_tokens)]
    with torch.no_grad(), im.record("attention_stats", spans=spans) as rec:
        out = im.generate(input_ids=ids, attention_mask=mask, max_new_tokens=max_new_tokens,
                          **{"do_sample": False, **generate_kwargs})
    tokens = out[:, width:]
    masses = [padded_stack([m[:, -1] for m in call["mass"]], dim=1, fill=float("nan"))   # [b, L, H, 2]
              for call in rec.calls[1:]]
    context, new = (torch.stack([m[..., i] for m in masses], 1) if masses else None for i in (0, 1))
    return _lookback(context, new, mask, tokens, _eos(im, generate_kwargs))


def from_patterns(patterns, attention_mask: torch.Tensor, tokens: torch.Tensor, eos=None) -> Lookback:
    """Reference in plain torch: the same Lookback from explicit patterns recorded during the same
    generation (a list over calls of lists over layers of [b, H, t, s], rec["pattern"] per call),
    the prompt's attention_mask [b, T0] and the generated tokens [b, n]; eos: the end token id(s)."""
    width = attention_mask.shape[1]
    context, new = [], []
    for call in patterns[1:]:
        last = padded_stack([p[:, :, -1] for p in call], dim=1, fill=float("nan"))       # [b, L, H, s]
        context.append(last[..., :width].sum(-1))
        new.append(last[..., width:].sum(-1))
    return _lookback(torch.stack(context, 1), torch.stack(new, 1), attention_mask, tokens, eos)


def step_entropy(patterns, valid: torch.Tensor) -> torch.Tensor:
    """The baseline's features: [b, L, H] mean over valid decode steps of each head's attention
    entropy −Σ p log p (nats) at the step's query, from explicit patterns (as `from_patterns`);
    valid [b, n − 1] bool, as Lookback.valid."""
    steps = []
    for call in patterns[1:]:
        last = padded_stack([p[:, :, -1] for p in call], dim=1, fill=float("nan"))       # [b, L, H, s]
        steps.append(-(last * last.clamp(min=1e-30).log()).sum(-1))
    return _mean_over_valid(torch.stack(steps, 1), valid.to(last.device))


def _lookback(context, new, mask, tokens, eos) -> Lookback:
    """context, new: [b, n − 1, L, H] masses on the two spans per decode step → Lookback."""
    b, steps = tokens.shape[0], tokens.shape[1] - 1
    valid = _valid_steps(tokens, eos)
    if context is None:
        nan = torch.full((b, 0), float("nan"))
        return Lookback(nan, nan, tokens, valid)
    counts = torch.arange(1, steps + 1, device=new.device).view(1, -1, 1, 1)         # j tokens generated
    mean_context = context / mask.sum(-1).to(context.device).view(-1, 1, 1, 1)
    mean_new = new / counts
    ratios = mean_context / (mean_context + mean_new)
    ratios = ratios.masked_fill(~valid.to(ratios.device).view(b, steps, 1, 1), float("nan"))
    return Lookback(_mean_over_valid(ratios, valid.to(ratios.device)), ratios, tokens, valid)


def _mean_over_valid(values: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """values [b, n, L, H] → [b, L, H]: the mean over each row's valid steps (NaN: none)."""
    keep = valid.view(*valid.shape, 1, 1)
    return values.masked_fill(~keep, 0).sum(1) / valid.sum(1).view(-1, 1, 1)


def _valid_steps(tokens: torch.Tensor, eos) -> torch.Tensor:
    """[b, n − 1] bool: decode step j (query = token j − 1, 0-based) counts while tokens[:j] hold no EOS."""
    if eos is None:
        return torch.ones(tokens.shape[0], tokens.shape[1] - 1, dtype=torch.bool, device=tokens.device)
    ended = torch.isin(tokens, torch.as_tensor(eos, device=tokens.device).view(-1)).cumsum(-1) > 0
    return ~ended[:, :-1]


def _eos(im, generate_kwargs):
    eos = generate_kwargs.get("eos_token_id")
    config = getattr(getattr(im, "model", im), "generation_config", None)
    return eos if eos is not None else getattr(config, "eos_token_id", None)


def _left_padded_mask(encoding) -> torch.Tensor:
    mask = encoding.get("attention_mask")
    if mask is None:
        return torch.ones_like(encoding["input_ids"])
    if mask.shape != encoding["input_ids"].shape:
        raise ShapeMismatchError(f"attention_mask must be [b, t] like input_ids {list(encoding['input_ids'].shape)}, "
                                 f"got {list(mask.shape)}")
    if not bool(mask[:, -1].bool().all()):
        raise InvalidArgumentError("lookback_ratios needs a left-padded batch (every row's last column real): "
                                   "generate appends new tokens after the last column; pad on the left")
    return mask


# ---- the detector -------------------------------------------------------------------------------
@dataclass(frozen=True)
class Detector:
    """Logistic regression on standardised features: score(x) = ((x − mean) / std) · weight + bias,
    mean, std and weight [f] fp64 (f features), bias [] (a scalar)."""
    mean: torch.Tensor
    std: torch.Tensor
    weight: torch.Tensor
    bias: torch.Tensor

    def score(self, x: torch.Tensor) -> torch.Tensor:
        """[n] fp64 logits of the positive class of features x [n, f]."""
        return ((x.double() - self.mean) / self.std) @ self.weight + self.bias


def fit_logistic(x: torch.Tensor, y: torch.Tensor, *, l2: float = L2, steps: int = LBFGS_STEPS) -> Detector:
    """Fit on x [n, f] and labels y [n] (0/1): mean binary cross-entropy + l2/2 · |w|², full-batch
    LBFGS in fp64 (plain torch; the paper used scikit-learn's LogisticRegression); a Detector
    (weight [f])."""
    x, y = _checked(x, y)
    mean, std = x.mean(0), x.std(0).clamp(min=1e-12)                 # constant features: weight stays ~0
    z = (x - mean) / std
    weight = torch.zeros(x.shape[1], dtype=torch.float64, requires_grad=True)
    bias = torch.zeros((), dtype=torch.float64, requires_grad=True)
    optimizer = torch.optim.LBFGS([weight, bias], max_iter=steps, line_search_fn="strong_wolfe")

    def loss():
        optimizer.zero_grad()
        fit = torch.nn.functional.binary_cross_entropy_with_logits(z @ weight + bias, y)
        value = fit + l2 / 2 * weight.square().sum()
        value.backward()
        return value

    with torch.enable_grad():
        optimizer.step(loss)
    return Detector(mean, std, weight.detach(), bias.detach())


def auroc(scores: torch.Tensor, labels: torch.Tensor) -> float:
    """Area under the ROC curve of scores [n] for labels [n] (0/1): the Mann-Whitney U over n₊ · n₋,
    ties counted one half."""
    scores, labels = _checked(scores.view(-1, 1), labels)
    scores = scores.view(-1)
    positives, negatives = scores[labels == 1], scores[labels == 0]
    wins = (positives[:, None] > negatives[None]).double() + 0.5 * (positives[:, None] == negatives[None]).double()
    return float(wins.mean())


def roc_curve(scores: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(false positive rates, true positive rates), each [m + 1] fp64 for m distinct values of
    scores [n] (labels [n], 0/1): from (0, 0) to (1, 1), one point per distinct score."""
    scores, labels = _checked(scores.view(-1, 1), labels)
    order = scores.view(-1).argsort(descending=True)
    sorted_scores, hits = scores.view(-1)[order], labels[order]
    last = torch.cat([sorted_scores[1:] != sorted_scores[:-1], torch.tensor([True])])    # end of each tie group
    tp, fp = hits.cumsum(0)[last], (1 - hits).cumsum(0)[last]
    zero = torch.zeros(1, dtype=torch.float64)
    return torch.cat([zero, fp / fp[-1]]), torch.cat([zero, tp / tp[-1]])


def _checked(x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    if x.dim() != 2 or y.dim() != 1 or x.shape[0] != y.shape[0]:
        raise ShapeMismatchError(f"expected features [n, f] and labels [n], got {list(x.shape)} and {list(y.shape)}")
    y = y.detach().cpu().double()
    if not bool(((y == 0) | (y == 1)).all()) or y.min() == y.max():
        raise InvalidArgumentError("labels must be 0/1 with both classes present")
    if bool(x.isnan().any()):
        raise InvalidArgumentError("features hold NaN (a row without a valid step): drop those rows first")
    return x.detach().cpu().double(), y
