"""Route control: force, disable, steer and record MoE routing inside a loaded transformers model.

`RouteControl(model)` is installed once per loaded model. It adds a forward hook to every router
(found by the family's router type, so dense layers and shared experts are never touched) that
re-runs the family's selection (core/families.py) on masked logits, and a pre-hook on the model
that notes which absolute positions the current forward covers. Interventions are scoped by
context managers, compose by nesting, and leave the model exactly as it was when they exit:

    control = RouteControl(model)
    with control.apply(Route.force({3: experts}, num_experts=E)), control.record() as rec:
        model.generate(...)
    rec.counts()      # (B, L, 2, E): tokens routed to each expert, [prompt, generated]

Shapes: B = batch rows, S = tokens in this forward, T = positions a route covers,
L = MoE layers (ordinal 0..L-1 in model order), E = routed experts, k = experts per token.
A route's per-layer tensor is (B|1, E) for "every position in scope" or (B|1, T, E) for absolute
positions 0..T-1 (positions >= T untouched). Batch dim 1 broadcasts over the rows.
"""
from __future__ import annotations

import contextlib
import copy
import re
from dataclasses import dataclass, field
from typing import Iterator, Literal, Mapping, NamedTuple, Sequence

import torch

from core.families import Family, UnsupportedModelError, family_for

Scope = Literal["prompt", "all"]
SCOPES: tuple[str, ...] = ("prompt", "all")
STEER_EPS = 0.01  # SteerMoE's epsilon
NEG_INF = float("-inf")


def mask_allowing(experts: torch.Tensor, num_experts: int) -> torch.Tensor:
    """Additive mask allowing exactly `experts` (..., k) -> (..., E): 0 allowed, -inf blocked."""
    mask = torch.full((*experts.shape[:-1], num_experts), NEG_INF, device=experts.device)
    return mask.scatter_(-1, experts, 0.0)


def mask_blocking(experts: torch.Tensor, num_experts: int) -> torch.Tensor:
    """Additive mask blocking `experts` (..., n) -> (..., E); top-k refills from the rest."""
    mask = torch.zeros((*experts.shape[:-1], num_experts), device=experts.device)
    return mask.scatter_(-1, experts, NEG_INF)


def _as_index(experts: torch.Tensor | Sequence[int]) -> torch.Tensor:
    return experts if isinstance(experts, torch.Tensor) else torch.as_tensor(list(experts), dtype=torch.long)


@dataclass(frozen=True)
class Route:
    """What route control does at each MoE layer, per batch row and position.

    masks: layer -> additive logit mask (0 allowed, -inf blocked), (B|1, E) or (B|1, T, E).
    steer: layer -> int8 (B|1, E) or (B|1, T, E): +1 activate, -1 deactivate (SteerMoE).
    scope: "prompt" applies to prompt tokens only; "all" also while decoding.
    """

    masks: Mapping[int, torch.Tensor] = field(default_factory=dict)
    steer: Mapping[int, torch.Tensor] = field(default_factory=dict)
    scope: Scope = "prompt"

    def __post_init__(self):
        if self.scope not in SCOPES:
            raise ValueError(f"scope must be one of {SCOPES}, got {self.scope!r}")

    @classmethod
    def force(cls, experts: Mapping[int, torch.Tensor], num_experts: int, scope: Scope = "prompt") -> "Route":
        """Force the allowed set: experts[layer] is (B|1, k) or (B|1, T, k) expert indices."""
        return cls(masks={l: mask_allowing(e, num_experts) for l, e in experts.items()}, scope=scope)

    @classmethod
    def disable(cls, experts: Mapping[int, torch.Tensor | Sequence[int]], num_experts: int,
                scope: Scope = "all") -> "Route":
        """Block experts[layer] (a list of expert ids) at every position in scope, for every row."""
        return cls(masks={l: mask_blocking(_as_index(e)[None], num_experts) for l, e in experts.items()},
                   scope=scope)

    @classmethod
    def steering(cls, activate: Mapping[int, Sequence[int]], deactivate: Mapping[int, Sequence[int]],
                 num_experts: int, scope: Scope = "all") -> "Route":
        """SteerMoE: push `activate` experts above the best and `deactivate` ones below the worst."""
        steer: dict[int, torch.Tensor] = {}
        for sign, chosen in ((1, activate), (-1, deactivate)):
            for l, experts in chosen.items():
                t = steer.setdefault(l, torch.zeros(1, num_experts, dtype=torch.int8))
                t[0, _as_index(experts)] = sign
        return cls(steer=steer, scope=scope)

    def layers(self) -> set[int]:
        return set(self.masks) | set(self.steer)


@dataclass(frozen=True)
class MoELayer:
    ordinal: int  # position among MoE layers
    decoder_index: int  # index in model.layers
    name: str  # module path of the router
    router: torch.nn.Module


@dataclass
class _Forward:
    """Where the current forward sits: its absolute positions and which tokens count."""

    start: int  # absolute position of the first token (= KV cache length)
    length: int  # S
    counted: torch.Tensor  # (B|1, S) bool: recorded (not padding, not after the row's EOS)
    is_prompt: torch.Tensor  # (B|1, S) bool


class RecordedPart(NamedTuple):
    """What one recording saw, to add into another one (a pipeline stage's share of a forward)."""

    counts: dict  # layer -> (B, 2E)
    indices: dict  # layer -> [(B, S, k)]
    tokens: torch.Tensor | None  # (B, 2), from the stage that sees the token ids first
    off_natural: dict  # layer -> (B, 2)
    logits: dict  # layer -> [(B, S, E)]


class RouteRecording:
    """Per-row routing counts (reduced on the device) and, optionally, the full top-k indices and
    the router's own logits.

    Besides what was selected it counts, per row, layer and phase, the selected experts that the
    router's own top-k (its selection on its unmodified logits) does not contain: zero wherever no
    route acted, the forced experts off that top-k where one did (route_monitor's signal)."""

    def __init__(self, num_layers: int, num_experts: int, keep_indices: bool, keep_logits: bool = False):
        self.num_layers, self.num_experts = num_layers, num_experts
        self.keep_indices, self.keep_logits = keep_indices, keep_logits
        self._counts: list[torch.Tensor | None] = [None] * num_layers  # layer -> (B, 2 * E)
        self._off_natural: list[torch.Tensor | None] = [None] * num_layers  # layer -> (B, 2)
        self._indices: list[list[torch.Tensor]] = [[] for _ in range(num_layers)]
        self._logits: list[list[torch.Tensor]] = [[] for _ in range(num_layers)]
        self._tokens: torch.Tensor | None = None  # (B, 2)

    def _add(self, layer: int, indices: torch.Tensor, fwd: _Forward, natural: torch.Tensor | None = None,
             logits: torch.Tensor | None = None) -> None:
        """indices: (B, S, k) selected; natural: (B, S, k) the router's own selection, None when a
        route changed nothing here; logits: (B, S, E) the router's unmodified logits."""
        b, s, k = indices.shape
        phase = (~fwd.is_prompt).long().expand(b, s)  # 0 = prompt, 1 = generated
        slot = (phase[..., None] * self.num_experts + indices).reshape(b, s * k)
        counted = fwd.counted.expand(b, s)
        weight = counted[..., None].expand(b, s, k).reshape(b, s * k).long()
        counts = torch.zeros(b, 2 * self.num_experts, dtype=torch.long, device=indices.device)
        counts.scatter_add_(1, slot, weight)
        self._counts[layer] = _plus(self._counts[layer], counts)
        if natural is not None:
            off = (indices[..., :, None] != natural[..., None, :]).all(-1).sum(-1)  # (B, S) selected not natural
            by_phase = torch.zeros(b, 2, dtype=torch.long, device=indices.device)
            by_phase.scatter_add_(1, phase, off * counted.long())
            self._off_natural[layer] = _plus(self._off_natural[layer], by_phase)
        if self.keep_indices:
            self._indices[layer].append(indices)
        if self.keep_logits and logits is not None:
            self._logits[layer].append(logits)

    def _add_tokens(self, fwd: _Forward) -> None:
        counted = fwd.counted.long()
        tokens = torch.stack([(counted * fwd.is_prompt).sum(1), (counted * ~fwd.is_prompt).sum(1)], dim=1)
        self._tokens = _plus(self._tokens, tokens)

    def counts(self) -> torch.Tensor:
        """(B, L, 2, E) int64: tokens whose top-k contains each expert; [:, :, 0] prompt, [:, :, 1] generated."""
        if any(c is None for c in self._counts):
            raise RuntimeError("nothing was recorded: run a forward inside the record() context")
        b = max(c.shape[0] for c in self._counts)
        return torch.stack([c.expand(b, -1) for c in self._counts], 1).view(b, self.num_layers, 2, self.num_experts)

    def off_natural(self) -> torch.Tensor:
        """(B, L, 2) int64: selected experts outside the router's own top-k, [prompt, generated]."""
        b = self.counts().shape[0]
        zero = torch.zeros(b, 2, dtype=torch.long)
        return torch.stack([zero if c is None else c.cpu().expand(b, -1) for c in self._off_natural], 1)

    def partial(self, with_tokens: bool) -> RecordedPart:
        """What this recording saw, to add into another one; the tokens only if `with_tokens`."""
        def kept(parts: list[list[torch.Tensor]]) -> dict:
            return {l: p for l, p in enumerate(parts) if p}

        def summed(parts: list[torch.Tensor | None]) -> dict:
            return {l: c for l, c in enumerate(parts) if c is not None}

        return RecordedPart(summed(self._counts), kept(self._indices), self._tokens if with_tokens else None,
                            summed(self._off_natural), kept(self._logits))

    def add_partial(self, part: RecordedPart) -> None:
        for layer, c in part.counts.items():
            self._counts[layer] = _plus(self._counts[layer], c.cpu())
        for layer, c in part.off_natural.items():
            self._off_natural[layer] = _plus(self._off_natural[layer], c.cpu())
        if self.keep_indices:
            for layer, parts in part.indices.items():
                self._indices[layer] += [p.cpu() for p in parts]
        if self.keep_logits:
            for layer, parts in part.logits.items():
                self._logits[layer] += [p.cpu() for p in parts]
        if part.tokens is not None:
            self._tokens = _plus(self._tokens, part.tokens.cpu())

    def tokens(self) -> torch.Tensor:
        """(B, 2) int64: tokens counted per row, [prompt, generated]."""
        if self._tokens is None:
            raise RuntimeError("nothing was recorded: run a forward inside the record() context")
        return self._tokens

    def indices(self, layer: int) -> torch.Tensor:
        """(B, S_total, k): the top-k experts at `layer` for every position seen (padding included)."""
        if not self.keep_indices:
            raise RuntimeError("indices were not kept: use record(keep_indices=True)")
        return _along_positions(self._indices[layer])

    def logits(self, layer: int) -> torch.Tensor:
        """(B, S_total, E): the router's unmodified logits at `layer` for every position seen."""
        if not self.keep_logits:
            raise RuntimeError("router logits were not kept: use record(keep_logits=True)")
        return _along_positions(self._logits[layer])


def _plus(total: torch.Tensor | None, more: torch.Tensor) -> torch.Tensor:
    return more if total is None else total + more


def _along_positions(parts: list[torch.Tensor]) -> torch.Tensor:
    """Forwards' (B|1, S, X) pieces joined along positions, batch-1 pieces broadcast."""
    b = max(p.shape[0] for p in parts)
    return torch.cat([p.expand(b, -1, -1) for p in parts], dim=1)


class ScopedInterventions:
    """The scoped public surface every route control shares (`RouteControl` on one model,
    `core.sharding.ShardedControl` over a sharded replica): contexts that add a route, a recording
    or the prompt's end to every forward inside them, removed cleanly on exit. A subclass holds
    `layers`, `num_experts`, `_routes`, `_recordings` and `_prompt_len`, and reads them in its forwards."""

    layers: list
    num_experts: int

    @property
    def num_layers(self) -> int:
        return len(self.layers)

    @contextlib.contextmanager
    def apply(self, route: Route) -> Iterator[None]:
        """Apply `route` to every forward inside the block; nested routes add up."""
        bad = [l for l in route.layers() if not 0 <= l < self.num_layers]
        if bad:
            raise ValueError(f"route names MoE layers {bad}; this model has layers 0..{self.num_layers - 1}")
        self._routes.append(route)
        try:
            yield
        finally:
            self._routes.remove(route)

    @contextlib.contextmanager
    def record(self, keep_indices: bool = False, keep_logits: bool = False) -> Iterator[RouteRecording]:
        """Record per-row expert counts (and optionally the top-k indices and the router's own
        logits) of forwards in the block."""
        rec = RouteRecording(self.num_layers, self.num_experts, keep_indices, keep_logits)
        self._recordings.append(rec)
        try:
            yield rec
        finally:
            self._recordings.remove(rec)

    @contextlib.contextmanager
    def prompt_length(self, n: int | torch.Tensor) -> Iterator[None]:
        """Declare where the prompt ends (absolute position, per row if a (B,) tensor).

        Needed for teacher-forced forwards of prompt + continuation; `generate` needs nothing:
        its prefill is the prompt and every later step is generated."""
        prev, self._prompt_len = self._prompt_len, n
        try:
            yield
        finally:
            self._prompt_len = prev


class RouteControl(ScopedInterventions):
    """Installed once per loaded model; all methods route through it."""

    def __init__(self, model: torch.nn.Module):
        self.model = model
        self.family: Family = family_for(model.config.model_type)
        router_type = self.family.router_type()
        self.layers: list[MoELayer] = []
        blocks: list[torch.nn.Module] = []  # the decoder layer holding each router
        for name, module in model.named_modules():
            if isinstance(module, router_type):
                where = re.match(r"(.*layers)\.(\d+)\.", name)
                self.layers.append(MoELayer(len(self.layers), int(where.group(2)), name, module))
                blocks.append(model.get_submodule(f"{where.group(1)}.{where.group(2)}"))
        if not self.layers:
            raise UnsupportedModelError(f"no {router_type.__name__} routers found in {type(model).__name__}: "
                                        "is this a MoE model?")
        first = self.layers[0].router
        self.num_experts: int = first.num_experts
        self.top_k: int = first.top_k
        self._routes: list[Route] = []
        self._recordings: list[RouteRecording] = []
        self._expand: tuple[int, int] | None = None  # (decoder index, rows)
        self._prompt_len: int | torch.Tensor | None = None  # explicit prompt boundary
        self._auto_prompt_len = 0  # the last prefill's length
        self._ended: torch.Tensor | None = None  # (B,) rows whose generated tokens reached EOS
        self._token_ids: torch.Tensor | None = None  # ids of a forward fed hidden states (a later stage)
        self._fwd: _Forward | None = None
        self._handles = [model.register_forward_pre_hook(self._begin_forward, with_kwargs=True)]
        for layer, block in zip(self.layers, blocks):
            self._handles.append(layer.router.register_forward_hook(self._router_hook(layer.ordinal)))
            self._handles.append(block.register_forward_pre_hook(self._expand_hook(layer.decoder_index),
                                                                 with_kwargs=True))

    # ---- public interventions: apply, record, prompt_length (ScopedInterventions) and ----------
    @contextlib.contextmanager
    def expand_at(self, moe_layer: int, rows: int) -> Iterator[None]:
        """Run the layers below `moe_layer` once on the forward's b rows, then continue as `rows` rows.

        This is how candidates share work: the hidden states entering the layer are computed
        once and copied, so each row can carry its own route from that layer on. With b > 1 (several
        prompts, e.g. a universal route's training prompts) each row is repeated rows / b times in
        place (row r becomes rows r*n .. r*n+n-1), and so are its attention mask and positions. A KV
        cache passed to such a forward must have `rows` rows from that layer on (`branch_cache`)."""
        prev, self._expand = self._expand, (self.layers[moe_layer].decoder_index, rows)
        try:
            yield
        finally:
            self._expand = prev

    @contextlib.contextmanager
    def token_ids(self, ids: torch.Tensor) -> Iterator[None]:
        """The token ids behind a forward that is fed hidden states (a pipeline stage after the
        first), so that recording tells prompt, answer and post-EOS filler apart as usual."""
        prev, self._token_ids = self._token_ids, ids
        try:
            yield
        finally:
            self._token_ids = prev

    def branch_cache(self, cache, moe_layer: int, rows: int):
        """A copy of a KV cache of b rows whose layers from `moe_layer` on have `rows` rows (each row
        repeated rows / b times in place, as `expand_at` repeats the hidden states).

        Layers below keep sharing the original tensors; the original is never modified (the
        dynamic cache appends by concatenation)."""
        start = self.layers[moe_layer].decoder_index
        new = copy.copy(cache)
        new.layers = [copy.copy(layer) for layer in cache.layers]
        for layer in new.layers[start:]:
            if layer.keys is None:  # a layer held by another pipeline stage (DummyLayer)
                continue
            layer.keys, layer.values = _repeat_rows(layer.keys, rows), _repeat_rows(layer.values, rows)
        return new

    def remove(self) -> None:
        """Uninstall: the model behaves exactly as before installation."""
        for h in self._handles:
            h.remove()
        self._handles.clear()

    # ---- hooks ------------------------------------------------------------------------------
    def _active(self) -> bool:
        return bool(self._routes or self._recordings or self._expand)

    def _begin_forward(self, module, args, kwargs):
        if not self._active():
            self._fwd = None
            return None
        ids = kwargs.get("input_ids", args[0] if args else None)
        ref = ids if ids is not None else kwargs["inputs_embeds"]
        if ids is None:
            ids = self._token_ids
        b, s = ref.shape[:2]
        past = kwargs.get("past_key_values")
        start = past.get_seq_length() if past is not None else 0
        mask = kwargs.get("attention_mask")
        device = ref.device
        counted = mask[:, -s:].bool() if mask is not None and mask.dim() == 2 else torch.ones(1, s, dtype=torch.bool, device=device)
        if start == 0:
            self._auto_prompt_len, self._ended = s, None
        bound = self._prompt_len if self._prompt_len is not None else self._auto_prompt_len
        positions = torch.arange(start, start + s, device=device)
        bound = torch.as_tensor(bound, device=device).reshape(-1, 1)  # (B|1, 1)
        is_prompt = positions[None, :] < bound
        if ids is not None:
            counted = counted & ~self._after_eos(ids, is_prompt)
        self._fwd = _Forward(start, s, counted, is_prompt)
        for rec in self._recordings:
            rec._add_tokens(self._fwd)
        return None

    def _after_eos(self, ids: torch.Tensor, is_prompt: torch.Tensor) -> torch.Tensor:
        """(B, S) generated positions holding a row's EOS or anything after it: `generate` keeps
        feeding finished rows (padding, with attention mask 1), and those tokens are no answer."""
        eos = self.model.generation_config.eos_token_id
        if eos is None:
            return torch.zeros_like(ids, dtype=torch.bool)
        is_end = torch.isin(ids, torch.as_tensor(eos, device=ids.device).reshape(-1)) & ~is_prompt
        ended = is_end.cumsum(dim=1) > 0
        if self._ended is not None and self._ended.shape[0] == ids.shape[0]:
            ended |= self._ended[:, None]
        self._ended = ended[:, -1]
        return ended & ~is_prompt

    def _expand_hook(self, decoder_index: int):
        def hook(module, args, kwargs):
            if self._expand is None:
                return None
            branch, rows = self._expand
            hidden = args[0] if args else kwargs["hidden_states"]
            if decoder_index == branch:
                hidden = _repeat_rows(hidden, rows).contiguous()
            elif decoder_index < branch:
                return None
            # The model computed its attention mask and positions once, for its b input rows: from
            # the branch on, every block needs them per row (b = 1 broadcasts and is left alone).
            kwargs = {**kwargs, **{name: _repeat_rows(kwargs[name], rows, single=False) for name in _PER_ROW_KWARGS
                                   if kwargs.get(name) is not None}}
            if args:
                return (hidden, *args[1:]), kwargs
            return args, {**kwargs, "hidden_states": hidden}
        return hook

    def _terms(self, table: Mapping[int, torch.Tensor], layer: int, fwd: _Forward,
               in_scope: torch.Tensor) -> torch.Tensor | None:
        """One route term for this forward's positions: (B|1, S, E), zero outside scope."""
        t = table.get(layer)
        if t is None:
            return None
        if t.dim() == 2:  # every position
            t = t[:, None, :].expand(-1, fwd.length, -1)
        else:  # absolute positions [0, T)
            lo, hi = min(fwd.start, t.shape[1]), min(fwd.start + fwd.length, t.shape[1])
            if lo == hi:
                return None
            t = torch.nn.functional.pad(t[:, lo:hi], (0, 0, 0, fwd.length - (hi - lo)))
        t = t.to(in_scope.device)
        return torch.where(in_scope[..., None], t, torch.zeros((), dtype=t.dtype, device=t.device))

    def _router_hook(self, layer: int):
        def hook(module, args, output):
            fwd = self._fwd
            if fwd is None:
                return None
            logits, weights, indices = output  # logits: (N, E), N = B * S
            n, e = logits.shape
            b, s = n // fwd.length, fwd.length
            z, steered, bias = logits.view(b, s, e), False, None
            for route in self._routes:
                # by position only: padding and post-EOS filler route as masked too (their outputs are unused)
                in_scope = fwd.is_prompt if route.scope == "prompt" else torch.ones_like(fwd.is_prompt)
                steer = self._terms(route.steer, layer, fwd, in_scope)
                if steer is not None:
                    z, steered = _steer(z, steer), True
                mask = self._terms(route.masks, layer, fwd, in_scope)
                if mask is not None:
                    bias = mask if bias is None else bias + mask
            natural = None  # the router's own selection, kept where a route replaces it
            if steered or bias is not None:
                if bias is not None and bias.shape[0] not in (1, b):
                    raise ValueError(f"route for MoE layer {layer} has {bias.shape[0]} rows; this forward has {b}")
                natural = indices.reshape(b, s, -1)
                flat = z.reshape(n, e)
                if self.family.bias_on_choice:
                    weights, indices = self.family.select(
                        module, flat, None if bias is None else bias.expand(b, s, e).reshape(n, e))
                else:
                    flat = flat if bias is None else (z + bias.to(z.dtype)).reshape(n, e)
                    weights, indices = self.family.select(module, flat)
                output = (logits, weights, indices)
            for rec in self._recordings:
                rec._add(layer, indices.reshape(b, s, -1), fwd, natural, logits.reshape(b, s, e))
            return output
        return hook


# Decoder-block arguments that carry one entry per batch row (tuples: rotary cos and sin).
_PER_ROW_KWARGS = ("attention_mask", "position_ids", "position_embeddings")


def _repeat_rows(x, rows: int, single: bool = True):
    """`x` (b, ...) as `rows` rows, each row repeated rows / b times in place; a batch of 1 is
    expanded (a view) if `single`, else left to broadcast; a tensor that already has `rows` rows
    (or is not a tensor) is returned as is."""
    if isinstance(x, tuple):
        return tuple(_repeat_rows(part, rows, single) for part in x)
    if not isinstance(x, torch.Tensor) or x.dim() == 0 or x.shape[0] == rows:
        return x
    if x.shape[0] == 1:
        return x.expand(rows, *x.shape[1:]) if single else x
    if rows % x.shape[0]:
        raise ValueError(f"cannot branch {x.shape[0]} rows into {rows}: rows must be a multiple of them")
    return x.repeat_interleave(rows // x.shape[0], dim=0)


def _steer(z: torch.Tensor, steer: torch.Tensor) -> torch.Tensor:
    """SteerMoE on logits z (B, S, E): s = log_softmax(z); activated experts -> max + eps,
    deactivated -> min - eps; tokens without steering keep z exactly."""
    s = torch.log_softmax(z.float(), dim=-1)
    top = s.max(dim=-1, keepdim=True).values + STEER_EPS
    low = s.min(dim=-1, keepdim=True).values - STEER_EPS
    s = torch.where(steer > 0, top, torch.where(steer < 0, low, s))
    return torch.where((steer != 0).any(-1, keepdim=True), s.to(z.dtype), z)
