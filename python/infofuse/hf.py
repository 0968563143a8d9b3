"""One patch for Hugging Face causal language models: the training loss without the N×V logits.

``patch(model)`` replaces the ``forward`` of one model instance (never its class). When the model is in training
mode and gets ``labels`` (or ``shift_labels``), the patched forward runs the model's own forward with
``labels=None`` and an empty ``logits_to_keep`` — the decoder, caches, MoE routers and output class are the stock
model's, and its head runs on zero positions — takes the decoder's last hidden states, and computes the causal-LM
loss with :func:`infofuse.linear_cross_entropy` against the output embedding (weight, bias, LoRA adapters), with
the family's logit transformations (final softcapping, logit scales). Everything else (eval, generation,
``logits_to_keep``, calls without labels) goes to the stock forward unchanged.

The loss is the one of transformers' ``ForCausalLMLoss``: labels shifted left with ``ignore_index`` padding (or
``shift_labels`` as given), mean over non-ignored tokens, or sum ÷ ``num_items_in_batch`` when that is passed
(``Trainer`` under gradient accumulation), plus ``router_aux_loss_coef × aux_loss`` where the model returns an
auxiliary router loss. Families whose head the patch cannot reproduce are refused by :func:`patch`; the list comes
from tests/test_hf.py, which compares every causal-LM family that transformers builds offline against its stock
forward. ``import infofuse`` does not import this module; it imports ``transformers`` (and ``peft``, when the head
is a PEFT layer) when called. A sharded head (tensor-parallel ``DTensor``, FSDP2, DeepSpeed ZeRO-3) is made whole on
every rank for the op; docs/hf.md says how and what that costs.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import inspect
import numbers

import torch
from torch import nn

from .linear_cross_entropy import linear_cross_entropy
from .log_probs import linear_log_probs

__all__ = ["patch", "unpatch", "is_patched", "log_probs", "REFUSED_FAMILIES"]

# Families whose loss the patch does not reproduce, by ``config.model_type``, each with what it does differently.
# Found by tests/test_hf.py (stock vs patched on a tiny model of every family); transformers 5.25.
_UNSHIFTED = (
    "its forward computes its own cross-entropy on labels that are not shifted (labels[..., i] is the target of "
    "logits[..., i]), not transformers' ForCausalLMLoss"
)
_PREDICTION_HEAD = (
    "its head applies a prediction transform (dense layer, activation, layer norm) to the decoder's output before "
    "the output embedding"
)
_NO_LOGITS_TO_KEEP = "its forward has no logits_to_keep argument, so it cannot be run without computing the logits"
REFUSED_FAMILIES: dict[str, str] = {
    **dict.fromkeys(
        ("bart", "bigbird_pegasus", "blenderbot", "blenderbot-small", "cpmant", "marian", "mbart", "mvp", "pegasus",
         "plbart"),
        _UNSHIFTED,
    ),
    **dict.fromkeys(
        ("bert", "big_bird", "camembert", "data2vec-text", "electra", "ernie", "megatron-bert", "modernbert-decoder",
         "rembert", "roberta", "roberta-prelayernorm", "roformer", "xlm-roberta", "xlm-roberta-xl"),
        _PREDICTION_HEAD,
    ),
    **dict.fromkeys(("trocr", "whisper"), _NO_LOGITS_TO_KEEP),
    "xlm": "its head (XLMPredLayer) computes the loss itself",
    "ergo": "its output embedding is an ErgoLinearWithFP32Output (a float32-output head), not an nn.Linear",
    "inkling_text": "its forward slices the vocabulary padding off the logits (unpadded_vocab_size) before the loss",
    "deepseek_v4": (
        "its hyper-connection head (hc_head) sits between the decoder and lm_head; the gradient of hc_head.hc_fn "
        "differed from stock by 3.5e-5 relative in float32, above the 1e-5 that verified families meet"
    ),
}  # fmt: skip

# Families whose head multiplies the logits by ``config.logits_scaling`` (Granite's divides by it).
_MULTIPLY_BY_LOGITS_SCALING = frozenset({"hyperclovax"})

_OPTIONS = ("impl", "chunk_size", "z_loss", "label_smoothing")
_STATE = "_infofuse_hf_state"


@dataclasses.dataclass
class _State:
    original: object  # the forward the instance had before the patch (an instance attribute or None)
    stock: object  # the forward the patched one calls
    fused: bool | None
    options: dict
    hook: object
    positional: tuple
    patched: object = None
    capturing: bool = False
    hidden: torch.Tensor | None = None


def _family(model) -> str:
    return f"{type(model).__name__} (model_type {getattr(model.config, 'model_type', '?')!r})"


def _unwrap(model):
    """The transformers model inside ``model`` (itself, or the base model of a PEFT model)."""
    from transformers import PreTrainedModel

    inner = model
    if not isinstance(inner, PreTrainedModel) and hasattr(inner, "get_base_model"):
        inner = inner.get_base_model()
    if not isinstance(inner, PreTrainedModel):
        raise TypeError(
            f"infofuse.hf.patch expects a transformers PreTrainedModel (or a PEFT model around one), "
            f"got {type(model).__name__}"
        )
    return inner


def _peft():
    try:
        import peft
    except ImportError:
        return None
    return peft


def _head_tensors(head, family: str, gather: bool = False):
    """(input transform, weight, bias) of the output embedding: logits = F.linear(transform(x), weight, bias).

    The transform is None for a plain linear head; for LoRA it appends s·dropout(x)·Aᵀ to x (and B to the weight),
    so that x Wᵀ + s·(dropout(x) Aᵀ) Bᵀ is one linear map of [x, s·dropout(x) Aᵀ] by [W, B]. With ``gather``, every
    tensor is whole (:func:`_gathered`); without it (the check in :func:`patch`), nothing is communicated.
    """
    peft = _peft()
    if peft is not None:
        from peft.tuners.tuners_utils import BaseTunerLayer
        from peft.utils.other import ModulesToSaveWrapper

        if isinstance(head, ModulesToSaveWrapper):
            if head.disable_adapters or not head.active_adapters:
                inner = head.original_module
            else:
                inner = head.modules_to_save[head.active_adapters[0]]
            return _head_tensors(inner, family, gather)
        if isinstance(head, BaseTunerLayer):
            return _lora_head(head, family, gather)
    if type(head) is not nn.Linear and not (isinstance(head, nn.Linear) and type(head).forward is nn.Linear.forward):
        raise TypeError(
            f"infofuse.hf: the output embedding of {family} is a {type(head).__name__}, not an nn.Linear (or a PEFT "
            "LoRA / modules_to_save layer around one); the patch cannot compute its loss without logits"
        )
    if gather:
        return None, _gathered(head.weight), _gathered(head.bias)
    return None, head.weight, head.bias


def _lora_head(head, family: str, gather: bool):
    from peft.tuners.lora import Linear as LoraLinear

    if type(head) is not LoraLinear:
        raise TypeError(
            f"infofuse.hf: the output embedding of {family} is a PEFT {type(head).__module__}.{type(head).__name__}; "
            "only LoRA (peft.tuners.lora.Linear) and modules_to_save are supported on the head"
        )
    base = head.get_base_layer()
    _, weight, bias = _head_tensors(base, family, gather)
    if head.disable_adapters or head.merged:
        return None, weight, bias
    adapters = []
    for name in head.active_adapters:
        if name not in head.lora_A:
            continue
        if name in getattr(head, "lora_variant", {}) or head.use_dora.get(name, False):
            raise TypeError(
                f"infofuse.hf: the LoRA adapter {name!r} on the head of {family} is a variant "
                f"({type(head.lora_variant.get(name)).__name__ if name in head.lora_variant else 'DoRA'}); only "
                "plain LoRA is supported on the head"
            )
        a, b = head.lora_A[name], head.lora_B[name]
        if a.bias is not None or b.bias is not None:
            raise TypeError(f"infofuse.hf: the LoRA adapter {name!r} on the head of {family} has a bias (lora_bias)")
        a, b = (_gathered(a.weight), _gathered(b.weight)) if gather else (a.weight, b.weight)
        adapters.append((a, b, head.scaling[name], head.lora_dropout[name]))
    if not adapters:
        return None, weight, bias

    def transform(x):
        parts = [x]
        for a, _, scaling, dropout in adapters:
            xa = dropout(x.to(a.dtype))
            parts.append((nn.functional.linear(xa, a) * scaling).to(x.dtype))
        return torch.cat(parts, dim=-1)

    weight = torch.cat([weight, *(b.to(weight.dtype) for _, b, _, _ in adapters)], dim=1)
    return transform, weight, bias


def _gathered(t):
    """``t`` whole and differentiable: a DTensor (FSDP2, tensor parallel) gathered with ``full_tensor()``; a
    DeepSpeed ZeRO-3 parameter (it has ``ds_id``; whole only inside :func:`_zero3_gathered`) copied, so that the
    op's backward still has it after ZeRO-3 partitions it again; other tensors as they are."""
    if t is None:
        return None
    if hasattr(t, "ds_id"):
        return t.clone()
    return t.full_tensor() if _is_dtensor(t) else t


def _unshard_fsdp2(head) -> None:
    """Unshard the FSDP2 units inside ``head`` (``fully_shard(model.lm_head)``): they reshard after the stock
    forward's call on zero positions, and a sharded parameter gathered by the patch would get its rank's gradient
    without FSDP2's reduction across ranks. Unsharded, the op uses FSDP2's own unsharded parameters, whose gradients
    FSDP2 reduce-scatters (and reshards) at the end of backward, as for a unit with ``reshard_after_forward=False``."""
    if not torch.distributed.is_available():
        return
    from torch.distributed.fsdp import FSDPModule

    for module in head.modules():
        if isinstance(module, FSDPModule):
            module.unshard()


def _zero3_gathered(head):
    """A context in which the DeepSpeed ZeRO-3 parameters of ``head`` are whole on every rank (their
    ``GatheredParameters``, read-only: ``modifier_rank=None``); a null context when it has none, deepspeed or not."""
    params = [p for p in head.parameters() if hasattr(p, "ds_id")]
    if not params:
        return contextlib.nullcontext()
    import deepspeed  # a parameter with ds_id comes from deepspeed, so it is importable

    return deepspeed.zero.GatheredParameters(params, modifier_rank=None)


def _is_dtensor(t) -> bool:
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:
        return False
    return isinstance(t, DTensor)


class _NoLogits(nn.Module):
    """Stands in for a tensor-parallel head while the stock forward applies it to zero positions: DTensor cannot
    propagate shardings through a zero-size tensor (``aten._unsafe_view``: "integer modulo by zero", torch 2.13), and
    a plain weight sharded by hand cannot meet the plain hidden states. Returns the empty logits, communicates
    nothing."""

    def __init__(self, out_features: int):
        super().__init__()
        self.out_features = out_features

    def forward(self, x, *args, **kwargs):
        return x.new_empty(*x.shape[:-1], self.out_features)


def _head_slot(model, head, family: str):
    """(parent module, attribute name) under which ``model`` holds ``head``."""
    for parent in model.modules():
        for name, child in parent.named_children():
            if child is head:
                return parent, name
    raise ValueError(f"infofuse.hf: the output embedding of {family} is not a submodule of the model")


@contextlib.contextmanager
def _stock_without_sharded_head(model, family: str):
    """Within it, the model's head is a :class:`_NoLogits` when its weight is a ``DTensor`` outside FSDP2 (tensor
    parallel); FSDP2 units keep their head, whose hooks unshard it for the call."""
    head = model.get_output_embeddings()
    _, weight, _ = _head_tensors(head, family)
    if _is_dtensor(weight):
        from torch.distributed.fsdp import FSDPModule

        sharded = not any(isinstance(module, FSDPModule) for module in head.modules())
    else:
        sharded = False
    if not sharded:
        yield
        return
    parent, name = _head_slot(model, head, family)
    setattr(parent, name, _NoLogits(weight.shape[0]))
    try:
        yield
    finally:
        setattr(parent, name, head)


def _logit_transform(model) -> tuple[float | None, float | None]:
    """(scale, softcap) applied by the family to its head's output: logits → softcap(scale · logits)."""
    config = model.config
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    scale = None
    logit_scale = getattr(model, "logit_scale", None)
    if isinstance(logit_scale, numbers.Real) and not isinstance(logit_scale, bool):
        scale = float(logit_scale)  # Cohere: logits * logit_scale
    logits_scaling = getattr(text, "logits_scaling", None)
    if isinstance(logits_scaling, numbers.Real) and logits_scaling != 1:
        if text.model_type in _MULTIPLY_BY_LOGITS_SCALING:
            scale = (scale or 1.0) * float(logits_scaling)
        else:
            scale = (scale or 1.0) / float(logits_scaling)  # Granite: logits / logits_scaling
    base = getattr(model, "model", None)
    multiplier = getattr(base, "lm_head_multiplier", None)
    if isinstance(multiplier, numbers.Real) and multiplier != 1:  # Falcon-H1: lm_head(x) * lm_head_multiplier
        scale = (scale or 1.0) * float(multiplier)
    softcap = getattr(text, "final_logit_softcapping", None)  # Gemma-2/3
    if softcap is None:
        softcap = getattr(text, "logits_soft_cap", None)  # RecurrentGemma
    return scale, (float(softcap) if softcap else None)


def _check_options(options: dict) -> dict:
    unknown = sorted(set(options) - set(_OPTIONS))
    if unknown:
        raise TypeError(f"infofuse.hf.patch got unknown options {unknown}; the options are fused and {list(_OPTIONS)}")
    return options


def patch(model, *, fused: bool | None = None, **options):
    """Make ``model``'s training forward compute its causal-LM loss without logits; returns ``model``.

    Args:
        model: a transformers causal LM (``...ForCausalLM``, ``...LMHeadModel``, ``...ForConditionalGeneration``),
            or a PEFT model around one (the inner model's forward is patched, so PEFT's wrappers call it).
        fused: None (default) uses the fused loss when the model is in training mode and gets ``labels`` or
            ``shift_labels``; True uses it whenever labels are given (eval too); False never (the patch then
            does nothing but can be kept for ``unpatch``).
        **options: passed to :func:`infofuse.linear_cross_entropy`: ``impl``, ``chunk_size``, ``z_loss``,
            ``label_smoothing`` (the last two change the loss from the stock one, on purpose).

    Raises:
        TypeError: not a transformers model; an output embedding that is not a linear layer (or LoRA /
            modules_to_save around one); unknown options.
        ValueError: a family in :data:`REFUSED_FAMILIES`, a forward without ``labels`` / ``logits_to_keep``, a
            loss function other than transformers' causal-LM loss.
    """
    if fused is not None and not isinstance(fused, bool):
        raise TypeError(f"fused must be None, True or False, got {fused!r}")
    _check_options(options)
    inner = _unwrap(model)
    family = _family(inner)
    model_type = getattr(inner.config, "model_type", None)
    if model_type in REFUSED_FAMILIES:
        raise ValueError(f"infofuse.hf.patch refuses {family}: {REFUSED_FAMILIES[model_type]}")
    if getattr(inner, _STATE, None) is not None:
        unpatch(inner)
    stock = inner.forward
    params = inspect.signature(stock).parameters
    for needed in ("labels", "logits_to_keep"):
        if needed not in params:
            raise ValueError(
                f"infofuse.hf.patch refuses {family}: its forward has no {needed!r} argument, so the patch cannot "
                "run it without computing the logits"
            )
    from transformers.loss.loss_utils import ForCausalLMLoss

    if inner.loss_function is not ForCausalLMLoss:
        raise ValueError(
            f"infofuse.hf.patch refuses {family}: its loss_function is {inner.loss_function!r}, not transformers' "
            "ForCausalLMLoss"
        )
    base = None  # the module whose last hidden state the head reads (BART-like: .model.decoder)
    with contextlib.suppress(AttributeError, NotImplementedError, ValueError):
        base = inner.get_decoder()
    for candidate in (inner.base_model, getattr(inner, "model", None)):
        if base is None or base is inner:
            base = candidate
    if not isinstance(base, nn.Module) or base is inner:
        raise ValueError(f"infofuse.hf.patch refuses {family}: it has no separate decoder / base model")
    head = inner.get_output_embeddings()
    if head is None:
        raise ValueError(f"infofuse.hf.patch refuses {family}: get_output_embeddings() is None")
    _head_tensors(head, family)  # raises for heads it cannot handle

    positional = tuple(
        p.name
        for p in params.values()
        if p.kind in (inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)
    )
    state = _State(
        original=inner.__dict__.get("forward"),
        stock=stock,
        fused=fused,
        options=dict(options),
        hook=None,
        positional=positional,
    )

    def capture(module, args, output):
        if state.capturing:
            if isinstance(output, torch.Tensor):
                state.hidden = output
            else:
                state.hidden = output[0] if isinstance(output, tuple) else output.last_hidden_state

    state.hook = base.register_forward_hook(capture)

    @functools.wraps(stock)
    def forward(*args, **kwargs):
        if args:
            if len(args) > len(state.positional):
                raise TypeError(f"forward() takes {len(state.positional)} positional arguments, got {len(args)}")
            kwargs.update(zip(state.positional, args, strict=False))
        use = inner.training if state.fused is None else state.fused
        labels, shift_labels = kwargs.get("labels"), kwargs.get("shift_labels")
        if not use or (labels is None and shift_labels is None) or kwargs.get("logits_to_keep") not in (None, 0):
            return state.stock(**kwargs)
        return _fused_forward(inner, state, family, kwargs)

    state.patched = forward
    object.__setattr__(inner, "forward", forward)
    object.__setattr__(inner, _STATE, state)
    return model


def _stock_hidden(model, state: _State, family: str, kwargs: dict, device):
    """The stock forward's output, run on zero head positions, and the decoder's last hidden states."""
    kwargs["logits_to_keep"] = torch.zeros(0, dtype=torch.long, device=device)
    state.capturing, state.hidden = True, None
    try:
        with _stock_without_sharded_head(model, family):
            out = state.stock(**kwargs)
    finally:
        state.capturing = False
    hidden, state.hidden = state.hidden, None
    if hidden is None:
        raise RuntimeError(f"infofuse.hf: the base model of {family} was not called by its forward")
    return out, hidden


def _head_operands(model, family: str, x):
    """(input, weight, bias, softcap) of the head's logits for the rows ``x``: the family's transform and
    logit scale folded into the input and bias, its final softcap returned for the op."""
    head = model.get_output_embeddings()
    _unshard_fsdp2(head)
    with _zero3_gathered(head):
        transform, weight, bias = _head_tensors(head, family, gather=True)
    if transform is not None:
        x = transform(x)
    scale, softcap = _logit_transform(model)
    if scale is not None:
        x = x * scale
        bias = None if bias is None else bias * scale
    return x, weight, bias, softcap


def _fused_forward(model, state: _State, family: str, kwargs: dict):
    labels = kwargs.pop("labels", None)
    shift_labels = kwargs.get("shift_labels")
    ignore_index = kwargs.get("ignore_index", -100)
    num_items = kwargs.get("num_items_in_batch")
    as_tuple = kwargs.get("return_dict") is False
    if as_tuple:
        kwargs["return_dict"] = True
    device = (labels if labels is not None else shift_labels).device
    out, hidden = _stock_hidden(model, state, family, kwargs, device)

    if shift_labels is None:
        shift_labels = nn.functional.pad(labels, (0, 1), value=ignore_index)[..., 1:]
    target = shift_labels.reshape(-1).to(hidden.device)
    x = hidden.reshape(-1, hidden.shape[-1])
    if x.shape[0] != target.shape[0]:
        raise ValueError(
            f"infofuse.hf: {family} produced {x.shape[0]} hidden states for {target.shape[0]} labels; labels must "
            "have the shape of input_ids"
        )
    x, weight, bias, softcap = _head_operands(model, family, x)
    loss = linear_cross_entropy(
        x,
        weight,
        target,
        linear_bias=bias,
        ignore_index=ignore_index,
        reduction="mean" if num_items is None else "sum",
        softcap=softcap,
        **state.options,
    )
    if num_items is not None:
        loss = loss / (num_items.to(loss.device) if torch.is_tensor(num_items) else num_items)
    aux = out.get("aux_loss") if labels is not None else None
    if aux is not None:
        coef = _aux_loss_coef(model)
        loss = loss + coef * aux.to(loss.device)
    fields = {k: v for k, v in out.items() if k not in ("loss", "logits")}
    result = type(out)(loss=loss, **fields)
    return result.to_tuple() if as_tuple else result


def log_probs(
    model,
    input_ids: torch.Tensor,
    labels: torch.Tensor,
    *,
    temperature: float = 1.0,
    return_entropy: bool = False,
    ignore_index: int = -100,
    **forward_kwargs,
):
    """Per-token log-probabilities (and entropy) of a patched causal LM, without the logits: the RL step's call.

    Runs the model's stock forward on zero head positions (as the patched training forward does), takes the
    decoder's last hidden states and calls :func:`infofuse.linear_log_probs` against the output embedding, with
    the family's head transform, logit scale and final softcap, and the patch's ``impl`` / ``chunk_size``.

    Args:
        model: a model passed through :func:`patch` (a PEFT model around one included).
        input_ids: (B, L) token ids, passed to the forward with ``forward_kwargs`` (``attention_mask``, ...).
        labels: (B, L) the ids to score, ``ignore_index`` where no score is wanted (the prompt, padding); as
            transformers' labels, unshifted: position i of the result scores ``labels[:, i + 1]`` given the
            tokens up to i, and the last position is 0.
        temperature, return_entropy, ignore_index: as in :func:`infofuse.linear_log_probs`.

    Returns:
        (B, L) float32 log-probabilities, or ``(log_probs, entropy)``; 0 at ignored positions. Differentiable
        through the model.
    """
    inner = _unwrap(model)
    state = getattr(inner, _STATE, None)
    if state is None:
        raise ValueError("infofuse.hf.log_probs needs a patched model: call infofuse.hf.patch(model) first")
    if not isinstance(labels, torch.Tensor) or tuple(labels.shape) != tuple(input_ids.shape):
        shape = tuple(labels.shape) if isinstance(labels, torch.Tensor) else type(labels).__name__
        raise ValueError(f"labels must be a tensor of input_ids' shape {tuple(input_ids.shape)}, got {shape}")
    family = _family(inner)
    kwargs = {**forward_kwargs, "input_ids": input_ids, "return_dict": True}
    _out, hidden = _stock_hidden(inner, state, family, kwargs, input_ids.device)
    target = nn.functional.pad(labels, (0, 1), value=ignore_index)[..., 1:].to(hidden.device)
    x, weight, bias, softcap = _head_operands(inner, family, hidden)
    options = {k: v for k, v in state.options.items() if k in ("impl", "chunk_size")}
    return linear_log_probs(
        x,
        weight,
        target,
        bias,
        temperature=temperature,
        softcap=softcap,
        return_entropy=return_entropy,
        ignore_index=ignore_index,
        **options,
    )


def _aux_loss_coef(model) -> float:
    text = model.config.get_text_config()
    for owner in (model, text):
        for name in ("router_aux_loss_coef", "aux_loss_coef"):
            value = getattr(owner, name, None)
            if value is not None:
                return value
    raise ValueError(f"infofuse.hf: {_family(model)} returns an aux_loss but has no router_aux_loss_coef")


def is_patched(model) -> bool:
    """Whether :func:`patch` is in effect on ``model`` (or on the transformers model inside a PEFT model)."""
    return getattr(_unwrap(model), _STATE, None) is not None


def unpatch(model):
    """Undo :func:`patch`: the instance gets back the forward it had; returns ``model``."""
    inner = _unwrap(model)
    state = getattr(inner, _STATE, None)
    if state is None:
        raise ValueError(f"infofuse.hf.unpatch: {_family(inner)} is not patched")
    if inner.__dict__.get("forward") is not state.patched:
        raise ValueError(
            f"infofuse.hf.unpatch: the forward of {_family(inner)} was replaced after patch() (by "
            f"{inner.__dict__.get('forward')!r}); undo that first"
        )
    state.hook.remove()
    if state.original is None:
        del inner.__dict__["forward"]
    else:
        object.__setattr__(inner, "forward", state.original)
    del inner.__dict__[_STATE]
    return model
