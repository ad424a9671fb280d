"""Layer-sharded models: one model over several stages, each holding a contiguous range of decoder layers.

Shard i of S holds decoder layers `layer_ranges(L, S)[i]`; the first also holds the token
embeddings, the last the final norm and the LM head. A shard reads only its own tensors from the
checkpoint's safetensors files (one `safe_open` slice per tensor, converted to the model's layout
by transformers' own loading code), so its memory is its share of the model (`ModelShard.param_bytes`).

A shard runs the family's own forward (`model(...)`, same masks, rotary and cache code as the
unsharded model) with the layers it does not hold replaced by pass-throughs: shards after the first
take hidden states as `inputs_embeds`, shards before the last return hidden states instead of
logits. Its KV cache holds its own layers only (the others are `DummyLayer`s, which the cache
skips when it measures lengths). Route control is installed on each shard with the *global* MoE
layer ordinals, so a route, a recording or `expand_at` means the same on a sharded model.

Stages talk by messages (`StageMessage`), so the same shard code runs in process (`LocalStages`,
the reference) or as Ray actors (actors/shard_worker.py). On the driver, `ShardedModel` and
`ShardedControl` present the surface the methods use (`model(...)`, `model.generate(...)`,
`control.apply/record/prompt_length/expand_at/branch_cache`), so F-SOUR, RoSais, SAFEx and
SteerMoE run on a sharded replica unchanged:

    lm = load_sharded(path, shards=2, dtype="float64")      # in process: the reference
    lm = sharded_loaded_model(path, RayStages(...))          # shards as Ray actors

Shapes: B = batch rows, S = tokens in this forward, H = hidden size, V = vocabulary.
"""
from __future__ import annotations

import collections
import contextlib
import glob
import itertools
import os
import weakref
from dataclasses import dataclass, field, replace
from typing import Any, Iterator, Protocol, Sequence

import torch
from transformers import AutoModelForCausalLM, GenerationConfig, PreTrainedModel
from transformers.cache_utils import DummyLayer, DynamicCache

from core.models import DTYPES, ModelLoadError, load_config, resolve_path
from core.routing import RecordedPart, Route, RouteControl, RouteRecording, ScopedInterventions


def layer_ranges(num_layers: int, shards: int) -> list[range]:
    """Contiguous decoder-layer ranges, as equal as possible (earlier shards take the remainder)."""
    if not 1 <= shards <= num_layers:
        raise ValueError(f"shards must be between 1 and the model's {num_layers} decoder layers, got {shards}")
    size, extra = divmod(num_layers, shards)
    bounds = list(itertools.accumulate([size + (i < extra) for i in range(shards)], initial=0))
    return [range(lo, hi) for lo, hi in zip(bounds, bounds[1:])]


class _PassThrough(torch.nn.Module):
    """Stands in for a decoder layer another shard holds: hidden states go through unchanged."""

    def forward(self, hidden_states, *args, **kwargs):
        return hidden_states


# ---- messages between stages -------------------------------------------------------------------

@dataclass(frozen=True)
class ControlState:
    """The driver's route-control contexts, sent with every forward so each shard applies them."""

    routes: tuple[Route, ...] = ()
    record: bool = False
    keep_indices: bool = False
    keep_logits: bool = False
    prompt_len: int | torch.Tensor | None = None
    expand: tuple[int, int] | None = None  # (MoE layer, rows)

    def rows(self, rows: slice, batch: int) -> "ControlState":
        """The contexts for batch rows `rows` of a `batch`-row forward (a micro-batch): per-row
        tensors (B, ...) are cut, broadcast ones (1, ...) kept. Not for recordings or `expand`,
        whose rows the driver adds up by position."""
        def cut(t):
            return t[rows] if isinstance(t, torch.Tensor) and t.dim() and t.shape[0] == batch else t

        routes = tuple(replace(r, masks={l: cut(m) for l, m in r.masks.items()},
                               steer={l: cut(m) for l, m in r.steer.items()}) for r in self.routes)
        return replace(self, routes=routes, prompt_len=cut(self.prompt_len))


@dataclass
class StageMessage:
    """One forward on its way through the stages.

    tokens: (B|1, S) the token ids (embedded by the first stage; read by route control everywhere).
    hidden: None into the first stage, (B, S, H) between stages, logits (B, K, V) out of the last.
    cache: id of the KV cache to use and extend (created on first use); None runs without one.
    recorded: per stage, what its recording saw (core.routing.RecordedPart) when recording.
    """

    tokens: torch.Tensor
    hidden: torch.Tensor | None = None
    attention_mask: torch.Tensor | None = None
    position_ids: torch.Tensor | None = None
    cache: int | None = None
    logits_to_keep: int = 0
    control: ControlState = field(default_factory=ControlState)
    recorded: list[RecordedPart] = field(default_factory=list)


# ---- one shard ---------------------------------------------------------------------------------

def _checkpoint_slices(local: str) -> tuple[dict[str, Any], list]:
    """name -> lazy safetensors slice for every tensor in the checkpoint (nothing read yet)."""
    from safetensors import safe_open

    files = sorted(glob.glob(os.path.join(local, "*.safetensors")))
    if not files:
        raise ModelLoadError(f"{local!r} has no .safetensors files: a sharded model reads its tensors from "
                             "safetensors checkpoints (re-save the model with save_pretrained)")
    slices, handles = {}, []
    for file in files:
        handle = safe_open(file, framework="pt", device="cpu")
        handles.append(handle)
        for name in handle.keys():
            slices[name] = handle.get_slice(name)
    return slices, handles


class ModelShard:
    """Decoder layers `layers` of a causal LM (plus embeddings if first, norm and LM head if last)."""

    def __init__(self, path: str, index: int, count: int, *, dtype: str = "auto",
                 experts_implementation: str | None = None, trust_remote_code: bool = False):
        local = resolve_path(path)
        config = load_config(local, trust_remote_code)
        if dtype not in DTYPES:
            raise ModelLoadError(f"dtype {dtype!r} is not one of {sorted(DTYPES)}")
        torch_dtype = DTYPES[dtype] if dtype != "auto" else getattr(config, "dtype", None) or torch.float32
        if isinstance(torch_dtype, str):  # "auto": the checkpoint's own dtype, as from_pretrained reads it
            torch_dtype = getattr(torch, torch_dtype)
        if experts_implementation is None and torch_dtype == torch.float64:
            experts_implementation = "eager"  # grouped_mm kernels take no float64
        kwargs = {"experts_implementation": experts_implementation} if experts_implementation else {}
        self.index, self.count = index, count
        self.layers = layer_ranges(config.num_hidden_layers, count)[index]
        self.first, self.last = index == 0, index == count - 1
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(config, dtype=torch_dtype,
                                                     trust_remote_code=trust_remote_code, **kwargs)
        # Route control first, on the whole skeleton, so MoE ordinals are the model's global ones;
        # hooks on layers this shard drops go with them.
        self.control = RouteControl(model)
        base = model.get_decoder()
        for i in range(config.num_hidden_layers):
            if i not in self.layers:
                base.layers[i] = _PassThrough()
        if not self.first:
            base.embed_tokens = None
        if not self.last:
            base.norm = torch.nn.Identity()
            model.lm_head = torch.nn.Identity()
        self._load_own_tensors(model, local, torch_dtype)
        # non-persistent buffers (rotary frequencies) are computed, not stored: build them for real
        base.rotary_emb = type(base.rotary_emb)(config=config)
        left = [n for n, t in itertools.chain(model.named_parameters(), model.named_buffers()) if t.is_meta]
        if left:
            raise ModelLoadError(f"shard {index} of {path!r}: tensors {left[:5]} were not in the checkpoint")
        model.generation_config = generation_config(local, config)  # its EOS ends recorded answers
        if torch.cuda.is_available():
            model = model.to("cuda")
        self.model = model.eval()
        self.config = config
        self._caches: dict[int, DynamicCache] = {}

    def _load_own_tensors(self, model: PreTrainedModel, local: str, dtype: torch.dtype) -> None:
        """Load the tensors this shard holds, through transformers' checkpoint conversion (fused
        experts, renamed keys), reading only their slices of the safetensors files."""
        from transformers.conversion_mapping import get_model_conversion_mapping
        from transformers.core_model_loading import convert_and_load_state_dict_in_model
        from transformers.modeling_utils import LoadStateDictConfig

        decoder = next(name for name, module in model.named_modules() if module is model.get_decoder())
        others = [f"{name}." for name, module in model.named_modules() if isinstance(module, _PassThrough)]
        if not self.last:
            others += ["lm_head.", f"{decoder}.norm."]
        tied = getattr(model.config, "tie_word_embeddings", False)
        if not self.first and not (tied and self.last):
            others.append(f"{decoder}.embed_tokens.")
        slices, handles = _checkpoint_slices(local)
        mine = {name: tensor for name, tensor in slices.items() if not name.startswith(tuple(others))}
        self.checkpoint_tensors = frozenset(mine)  # names of the checkpoint's tensors this shard reads
        if tied and self.last and not self.first:  # the LM head is the embedding matrix
            embed = next(n for n in mine if "embed_tokens" in n)
            mine["lm_head.weight"] = mine.pop(embed)
        load = LoadStateDictConfig(pretrained_model_name_or_path=local, dtype=dtype,
                                   dtype_plan=model._get_dtype_plan(dtype), device_map={"": "cpu"},
                                   weight_mapping=get_model_conversion_mapping(model, None, None))
        try:
            convert_and_load_state_dict_in_model(model=model, state_dict=mine, load_config=load)
        finally:
            for handle in handles:
                handle.__exit__(None, None, None)

    def param_bytes(self) -> int:
        """Bytes of the parameters and buffers this shard holds."""
        return sum(t.numel() * t.element_size()
                   for t in itertools.chain(self.model.parameters(), self.model.buffers()))

    def new_cache(self) -> DynamicCache:
        """A KV cache for this shard's layers; the others are dummies, skipped when lengths are measured."""
        cache = DynamicCache(config=self.config)
        cache.layers = [layer if i in self.layers else DummyLayer() for i, layer in enumerate(cache.layers)]
        return cache

    @torch.inference_mode()
    def run(self, msg: StageMessage) -> StageMessage:
        """This shard's part of a forward: embeddings (first), its layers, norm and head (last)."""
        control, state, device = self.control, msg.control, self.model.device
        past = None
        if msg.cache is not None:
            past = self._caches.get(msg.cache)
            if past is None:
                past = self._caches[msg.cache] = self.new_cache()
        inputs = ({"input_ids": msg.tokens.to(device)} if self.first
                  else {"inputs_embeds": msg.hidden.to(device)})
        with contextlib.ExitStack() as scope:
            for route in state.routes:
                scope.enter_context(control.apply(route))
            if state.prompt_len is not None:
                scope.enter_context(control.prompt_length(state.prompt_len))
            if state.expand is not None:
                scope.enter_context(control.expand_at(*state.expand))
            rec = scope.enter_context(control.record(state.keep_indices, state.keep_logits)) if state.record else None
            scope.enter_context(control.token_ids(msg.tokens.to(device)))
            out = self.model(**inputs,
                             attention_mask=None if msg.attention_mask is None else msg.attention_mask.to(device),
                             position_ids=None if msg.position_ids is None else msg.position_ids.to(device),
                             past_key_values=past, use_cache=past is not None,
                             logits_to_keep=msg.logits_to_keep if self.last else 0)
        recorded = list(msg.recorded)
        if rec is not None:
            recorded.append(rec.partial(self.first))
        return replace(msg, hidden=out.logits, recorded=recorded)

    # caches: each shard keeps its own, addressed by the driver's ids
    def branch_cache(self, source: int, target: int, moe_layer: int, rows: int) -> None:
        self._caches[target] = self.control.branch_cache(self._caches[source], moe_layer, rows)

    def free_caches(self, ids: Sequence[int]) -> None:
        for i in ids:
            self._caches.pop(i, None)


# ---- transports: how messages reach the stages ---------------------------------------------------

class Stages(Protocol):
    """The stages of one replica, in order, and how a message goes through them.

    `submit` sends a message on its way and returns at once where the transport pipelines (the
    stages work on earlier messages meanwhile); `result` waits for it. Messages go through each
    stage in the order submitted."""

    def __len__(self) -> int: ...

    def submit(self, msg: StageMessage) -> Any: ...

    def result(self, ticket: Any) -> StageMessage: ...

    def forward(self, msg: StageMessage) -> StageMessage: ...

    def forward_many(self, msgs: Sequence[StageMessage]) -> list[StageMessage]: ...

    def branch_cache(self, source: int, target: int, moe_layer: int, rows: int) -> None: ...

    def free_caches(self, ids: Sequence[int]) -> None: ...


class LocalStages:
    """All shards in this process, one after another: the reference transport (no pipelining)."""

    def __init__(self, shards: Sequence[ModelShard]):
        self.shards = list(shards)
        self.config = self.shards[0].config

    def __len__(self) -> int:
        return len(self.shards)

    def forward(self, msg: StageMessage) -> StageMessage:
        for shard in self.shards:
            msg = shard.run(msg)
        return msg

    submit = forward  # nothing to overlap: the ticket is the finished message

    def result(self, ticket: StageMessage) -> StageMessage:
        return ticket

    def forward_many(self, msgs: Sequence[StageMessage]) -> list[StageMessage]:
        return [self.forward(m) for m in msgs]

    def branch_cache(self, source: int, target: int, moe_layer: int, rows: int) -> None:
        for shard in self.shards:
            shard.branch_cache(source, target, moe_layer, rows)

    def free_caches(self, ids: Sequence[int]) -> None:
        for shard in self.shards:
            shard.free_caches(ids)


# ---- the driver's view: a model and a route control over the stages ------------------------------

_cache_ids = itertools.count(1)


class ShardedCache:
    """The driver's handle on one KV cache held piecewise by the stages; freed there when dropped."""

    def __init__(self, stages: Stages, length: int):
        self.id, self.length = next(_cache_ids), length
        weakref.finalize(self, stages.free_caches, [self.id])

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return self.length


@dataclass
class ShardedOutput:
    logits: torch.Tensor
    past_key_values: ShardedCache | None


class ShardedControl(ScopedInterventions):
    """Route control over a sharded replica: the same public surface as `RouteControl`.

    Contexts are kept here and sent with each forward; recordings come back from the stages and
    add up into one `RouteRecording` per `record()`."""

    def __init__(self, stages: Stages, reference: RouteControl):
        self.stages = stages
        self.family, self.layers = reference.family, reference.layers
        self.num_experts, self.top_k = reference.num_experts, reference.top_k
        self._routes: list[Route] = []
        self._recordings: list[RouteRecording] = []
        self._prompt_len: int | torch.Tensor | None = None
        self._expand: tuple[int, int] | None = None

    @contextlib.contextmanager
    def expand_at(self, moe_layer: int, rows: int) -> Iterator[None]:
        prev, self._expand = self._expand, (moe_layer, rows)
        try:
            yield
        finally:
            self._expand = prev

    def branch_cache(self, cache: ShardedCache, moe_layer: int, rows: int) -> ShardedCache:
        new = ShardedCache(self.stages, cache.length)
        self.stages.branch_cache(cache.id, new.id, moe_layer, rows)
        return new

    def state(self) -> ControlState:
        return ControlState(tuple(self._routes), bool(self._recordings),
                            any(r.keep_indices for r in self._recordings), any(r.keep_logits for r in self._recordings),
                            self._prompt_len, self._expand)

    def collect(self, msg: StageMessage) -> None:
        """Add a finished forward's per-stage recordings to every open `record()`."""
        for rec in self._recordings:
            for part in msg.recorded:
                rec.add_partial(part)


class ShardedModel:
    """The driver's model over the stages: `model(...)` and greedy `model.generate(...)` as the methods
    call them on a transformers model."""

    def __init__(self, stages: Stages, config, generation_config: GenerationConfig, control: ShardedControl):
        self.stages, self.config, self.generation_config, self.control = stages, config, generation_config, control
        self.device = torch.device("cpu")  # where the driver keeps inputs and outputs
        self.generate_micro_batches: int | None = None  # None: one per stage (1: the whole batch at once)

    def message(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                position_ids: torch.Tensor | None = None, past_key_values: ShardedCache | None = None,
                use_cache: bool | None = None, logits_to_keep: int = 0,
                control: ControlState | None = None) -> tuple[StageMessage, ShardedCache | None]:
        cache = past_key_values
        if cache is None and use_cache:
            cache = ShardedCache(self.stages, 0)
        msg = StageMessage(input_ids.cpu(), None, attention_mask, position_ids, None if cache is None else cache.id,
                           logits_to_keep, control or self.control.state())
        if cache is not None:
            cache.length += input_ids.shape[1]
        return msg, cache

    def __call__(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                 position_ids: torch.Tensor | None = None, past_key_values: ShardedCache | None = None,
                 use_cache: bool | None = None, logits_to_keep: int = 0) -> ShardedOutput:
        msg, cache = self.message(input_ids, attention_mask, position_ids, past_key_values, use_cache,
                                  logits_to_keep)
        out = self.stages.forward(msg)
        self.control.collect(out)
        return ShardedOutput(out.hidden, cache)

    def forward_many(self, msgs: Sequence[StageMessage]) -> list[torch.Tensor]:
        """Independent forwards (micro-batches), pipelined through the stages where the transport can."""
        outs = self.stages.forward_many(msgs)
        for out in outs:
            self.control.collect(out)
        return [out.hidden for out in outs]

    @torch.inference_mode()
    def generate(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None, *,
                 do_sample: bool = False, max_new_tokens: int = 128, pad_token_id: int | None = None,
                 **unused) -> torch.Tensor:
        """Greedy decoding as transformers' `generate` does it: positions from the attention mask,
        finished rows fed the pad token (attention mask 1), stop when every row has hit EOS.

        The rows are split into one micro-batch per stage, each with its own KV cache, decoded
        in turn: a micro-batch's next step is submitted as soon as its token is known, so while
        the last stage finishes one micro-batch the first already runs the next (every stage
        busy). Rows do not interact, so the answers are those of the whole batch. Inside
        `record()` or `expand_at` (whose rows the driver counts by position) the batch stays whole."""
        if do_sample or unused:
            raise ValueError(f"a sharded model generates greedily only; got do_sample={do_sample}, {sorted(unused)}")
        eos = self.generation_config.eos_token_id
        eos = torch.as_tensor([] if eos is None else eos).reshape(-1)
        pad = pad_token_id if pad_token_id is not None else self.generation_config.pad_token_id
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        batch = input_ids.shape[0]
        if batch == 0 or max_new_tokens <= 0:
            return input_ids
        state = self.control.state()
        # a micro-batch that ends early is padded to the others' length, which needs a pad token
        split = pad is not None and not state.record and state.expand is None
        parts = torch.arange(batch).tensor_split((self.generate_micro_batches or len(self.stages)) if split else 1)
        decodes = [_Decode(input_ids[p], attention_mask[p], state.rows(slice(int(p[0]), int(p[-1]) + 1), batch)
                           if len(parts) > 1 else state) for p in parts if len(p)]
        queue = collections.deque((d, self._submit_step(d)) for d in decodes)
        while queue:  # first in, first out: the order the stages finish them
            d, ticket = queue.popleft()
            out = self.stages.result(ticket)
            self.control.collect(out)
            if d.advance(out.hidden[:, -1].argmax(-1).cpu(), pad, eos, max_new_tokens):
                queue.append((d, self._submit_step(d)))
        width = max(d.ids.shape[1] for d in decodes)
        return torch.cat([torch.nn.functional.pad(d.ids, (0, width - d.ids.shape[1]), value=pad if pad is not None else 0)
                          for d in decodes])

    def _submit_step(self, d: "_Decode"):
        msg, d.cache = self.message(d.step_ids, attention_mask=d.attention_mask,
                                    position_ids=d.position_ids[:, -d.step_ids.shape[1]:], past_key_values=d.cache,
                                    use_cache=True, logits_to_keep=1, control=d.control)
        return self.stages.submit(msg)


class _Decode:
    """One micro-batch of a greedy generation: its tokens so far, masks, positions and KV cache.

    ids, attention_mask, position_ids: (B, P + steps); step_ids: (B, 1) the last tokens (the prompt at first)."""

    def __init__(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, control: ControlState):
        self.ids = self.step_ids = input_ids
        self.attention_mask, self.control, self.cache, self.steps = attention_mask, control, None, 0
        self.position_ids = (attention_mask.long().cumsum(-1) - 1).masked_fill(attention_mask == 0, 0)  # (B, P)
        self.unfinished = torch.ones(input_ids.shape[0], dtype=torch.bool)

    def advance(self, nxt: torch.Tensor, pad: int | None, eos: torch.Tensor, max_new_tokens: int) -> bool:
        """Append the next tokens (B,); whether another step is due."""
        if pad is not None:
            nxt = torch.where(self.unfinished, nxt, torch.as_tensor(pad))
        self.ids = torch.cat([self.ids, nxt[:, None]], dim=1)
        self.unfinished &= ~torch.isin(nxt, eos)
        self.steps += 1
        if not self.unfinished.any() or self.steps == max_new_tokens:
            return False
        self.step_ids = nxt[:, None]
        self.attention_mask = torch.cat([self.attention_mask, self.attention_mask.new_ones(len(nxt), 1)], dim=1)
        self.position_ids = torch.cat([self.position_ids, self.position_ids[:, -1:] + 1], dim=1)
        return True


def sharded_loaded_model(path: str, stages: Stages, *, name: str | None = None,
                         trust_remote_code: bool = False):
    """A `LoadedModel` whose model and route control run over `stages` (the shards of `path`):
    the methods need nothing else. The driver holds no weights: its reference control is built on
    the meta device, for the layer ordinals and expert counts."""
    from transformers import AutoTokenizer

    from core.models import LoadedModel

    local = resolve_path(path)
    config = load_config(local, trust_remote_code)
    with torch.device("meta"):
        skeleton = AutoModelForCausalLM.from_config(config, trust_remote_code=trust_remote_code)
    reference = RouteControl(skeleton)
    reference.remove()
    tokenizer = AutoTokenizer.from_pretrained(local, trust_remote_code=trust_remote_code)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.padding_side = "left"
    control = ShardedControl(stages, reference)
    model = ShardedModel(stages, config, generation_config(local, config), control)
    return LoadedModel(name or path, model, tokenizer, control)


def generation_config(local: str, config) -> GenerationConfig:
    """The checkpoint's generation config, as `from_pretrained` would attach it."""
    try:
        return GenerationConfig.from_pretrained(local)
    except OSError:
        return GenerationConfig.from_model_config(config)


def load_sharded(path: str, shards: int, *, name: str | None = None, dtype: str = "auto",
                 experts_implementation: str | None = None, trust_remote_code: bool = False):
    """All `shards` shards of `path` in this process (no pipelining): the Ray-free reference."""
    stages = LocalStages([ModelShard(path, i, shards, dtype=dtype, experts_implementation=experts_implementation,
                                     trust_remote_code=trust_remote_code) for i in range(shards)])
    return sharded_loaded_model(path, stages, name=name, trust_remote_code=trust_remote_code)
